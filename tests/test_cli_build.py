"""vmctl image build: following a build job, driven by a scripted sequence of statuses."""

from __future__ import annotations

import pytest
from rich.console import Console

from vmctl.buildprogress import BuildProgress, follow
from vmctl.errors import CLIError

ALL = ["prepare", "resolve", "disk", "debootstrap", "import"]


def _job(state, steps, **kw):
    return {"image": "img", "state": state, "all_steps": ALL, "seconds": 12.0,
            "step": steps[-1][0] if steps else None, "log": "/x/build.log",
            "steps": [{"name": n, "state": s, "seconds": 1.5} for n, s in steps],
            "log_tail": "I: Retrieving Packages\nI: Validating Packages", **kw}


def _driver(docs):
    seq = list(docs)

    def call(op, **params):
        assert op == "image_build_status" and params == {"image": "img"}
        return seq.pop(0) if len(seq) > 1 else seq[0]
    return call


def test_follows_until_done_printing_each_finished_step_once(capsys):
    call = _driver([_job("running", [("prepare", "running")]),
                    _job("running", [("prepare", "done"), ("resolve", "running")]),
                    _job("done", [(n, "done") for n in ALL], result={"name": "img"})])
    doc = follow(call, "img", BuildProgress("img", live=False), timeout=30, poll=0)
    assert doc["state"] == "done"
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split()[1] for ln in lines] == ALL


def test_a_failed_build_names_the_step_and_shows_the_log_tail():
    call = _driver([_job("failed", [("prepare", "done"), ("resolve", "failed")],
                         failed_step="resolve", error="apt said no")])
    with pytest.raises(CLIError) as info:
        follow(call, "img", BuildProgress("img", enabled=False), timeout=30, poll=0)
    err = info.value
    assert err.code == "build_failed" and err.exit_code == 1
    assert "failed at step resolve: apt said no" in err.message
    assert "I: Validating Packages" in err.message and err.details["build"]["state"] == \
        "failed"


def test_gives_up_after_the_timeout_saying_the_build_goes_on():
    call = _driver([_job("running", [("prepare", "running")])])
    with pytest.raises(CLIError) as info:
        follow(call, "img", BuildProgress("img", enabled=False), timeout=0.01, poll=0)
    assert info.value.code == "timeout" and "it goes on" in info.value.message


def test_live_display_renders_steps_and_the_last_log_line():
    p = BuildProgress("img", live=False)
    p.doc = _job("running", [("prepare", "done"), ("resolve", "running")])
    console = Console(width=100, record=True)
    console.print(p._render())
    text = console.export_text()
    assert "building img" in text and "prepare" in text and "debootstrap" in text
    assert "I: Validating Packages" in text
    console.print(p._render(final=True))
