"""``vmctl run`` and the CI options of ``vmctl create`` without an agent: the job's
remote command, --env, the TTL a job VM gets, and bad input refused before anything
is made (exit 2)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from cli_helpers import home, run  # noqa: F401
from vmctl.errors import CLIError
from vmctl.job import DEFAULT_TTL, KEEP_MARGIN, TTL_MARGIN, JobSpec, parse_env


def test_remote_command_copies_then_runs_in_the_job_dir():
    spec = JobSpec(command=["./run-tests.sh", "--fast"], copy=Path("proj"),
                   env={"A": "1 2", "B": "x'y"})
    cmd = spec.remote_command()
    assert cmd.startswith("mkdir -p job && cd job && tar -xf - && exec env ")
    words = shlex.split(cmd.split("exec ", 1)[1])
    assert words == ["env", "A=1 2", "B=x'y", "sh", "-c", "./run-tests.sh --fast"]
    # one word is a command line as it is; no --copy: no tar
    plain = JobSpec(command=["make test && echo ok"]).remote_command()
    assert "tar" not in plain and shlex.split(plain.split("exec ", 1)[1]) == [
        "sh", "-c", "make test && echo ok"]


def test_the_job_vm_outlives_its_timeout_by_a_margin():
    assert JobSpec(command=["true"], timeout=600).ttl() == 600 + TTL_MARGIN
    assert JobSpec(command=["true"]).ttl() == DEFAULT_TTL
    assert JobSpec(command=["true"], timeout=60, keep_on_failure=True).ttl() == \
        60 + TTL_MARGIN + KEEP_MARGIN


def test_env_values():
    assert parse_env(("A=1", "B_2=x=y", "C=")) == {"A": "1", "B_2": "x=y", "C": ""}
    for bad in ("A", "=1", "1A=2", "A-B=1"):
        with pytest.raises(CLIError):
            parse_env((bad,))


@pytest.mark.parametrize("args,message", [
    (["run", "--", "true"], "give --template T or --pool P"),
    (["run", "-t", "t", "-p", "p", "--", "true"], "give --template T or --pool P"),
    (["run", "-t", "t", "--timeout", "soon", "--", "true"], "--timeout: cannot parse"),
    (["run", "-t", "t", "--env", "NOPE", "--", "true"], "--env 'NOPE'"),
    (["run", "-t", "Bad_Name", "--", "true"], "is invalid"),
    (["create", "v1", "--ttl", "forever"], "--ttl: cannot parse"),
    (["create", "v1", "--ttl", "0"], "out of range"),
    (["create", "v1", "-t", "t", "--pool", "p"], "--template and --pool"),
])
def test_bad_input_is_refused_before_anything_is_made(run, args, message):
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr


def test_run_needs_a_command(run):
    res = run("run", "-t", "tpl")
    assert res.exit_code == 2 and "COMMAND" in res.stderr
