"""``vmctl ui`` and ``vmctl vnc`` against real agents (no guest): the link, --open with
the desktop's browser ($BROWSER), --json and --quiet, and the clear failures (no TCP
listener, no such VM, no browser)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from agent_helpers import ROOT, AgentProcess


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    base = tmp_path_factory.mktemp("clibrowser")
    tcp = AgentProcess(base / "tcp", token="cli-browser-token-0123456789abcdef").start()
    local = AgentProcess(base / "local").start()          # no TCP listener
    try:
        yield tcp, local
    finally:
        tcp.cleanup()
        local.cleanup()


def _vmctl(agent, *args, env=None):
    return subprocess.run([sys.executable, "-m", "vmctl", "--host", agent.unix, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "VMCTL_CONFIG": os.devnull, **(env or {})})


def test_ui_prints_a_single_use_link(agents):
    tcp, _ = agents
    res = _vmctl(tcp, "ui")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"http://127.0.0.1:{tcp.port}/ui/link/vml_")
    assert "works once" in res.stderr
    doc = json.loads(_vmctl(tcp, "--json", "ui", "--ttl", "30").stdout)
    assert doc["expires_in"] == 30 and doc["user"] == "root"
    quiet = _vmctl(tcp, "-q", "ui")
    assert quiet.stdout.count("\n") == 1 and quiet.stderr == ""


def test_open_hands_the_link_to_the_browser(agents, tmp_path):
    tcp, _ = agents
    seen = tmp_path / "seen"
    script = tmp_path / "browser"
    script.write_text(f"#!/bin/sh\necho \"$1\" > {seen}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    res = _vmctl(tcp, "ui", "--open", env={"BROWSER": str(script), "DISPLAY": ""})
    assert res.returncode == 0, res.stderr
    assert seen.read_text().strip() == res.stdout.strip()
    none = _vmctl(tcp, "ui", "--open", env={"BROWSER": "/bin/false", "DISPLAY": ""})
    assert none.returncode == 1 and "could not open a browser" in none.stderr
    assert none.stdout.startswith("http://")          # the link is printed anyway


def test_failures_are_clear(agents):
    tcp, local = agents
    res = _vmctl(local, "ui")
    assert res.returncode == 4 and "--listen" in res.stderr
    res = _vmctl(tcp, "vnc", "nope")
    assert res.returncode == 3 and "nope" in res.stderr
    res = _vmctl(tcp, "vnc", "Bad_Name")
    assert res.returncode == 2
    res = _vmctl(tcp, "vnc", "x", "--ttl", "601")
    assert res.returncode == 2
