"""``vmctl events [NAME] [--follow]`` against a real vmagent process (no guest boots:
VMs are created with --no-start)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

from cli_helpers import agent, ensure_test_image, home, local, run  # noqa: F401
from test_cli_agent import _key


def test_events_of_one_vm_and_of_all(local, home):
    ensure_test_image(local)
    for name in ("ev1", "ev2"):
        made = local("create", name, "--image", "test", "--memory", "256M", "--no-start",
                     "--ssh-key", _key(home), "--restart", "always")
        assert made.exit_code == 0, made.stderr
    try:
        assert local("push-config", "ev1", "--memory", "384M").exit_code == 0
        doc = json.loads(local("--json", "events", "ev1").stdout)
        ops = [(e["op"], e["result"]) for e in doc["events"] if e["type"] == "operation"]
        assert ops == [("create", "ok"), ("push_config", "ok")], doc
        assert all(e["vm"] == "ev1" for e in doc["events"])
        human = local("events", "ev1")
        assert human.exit_code == 0 and "push_config by " in human.stdout
        every = json.loads(local("--json", "events").stdout)["events"]
        assert {e["vm"] for e in every} >= {"ev1", "ev2"}
        assert [e["time"] for e in every] == sorted(e["time"] for e in every)
        shown = json.loads(local("--json", "show", "ev2").stdout)
        assert shown["spec"]["restart"] == "always" and shown["restarts"] == 0
        missing = local("events", "nope")
        assert missing.exit_code == 3 and "nope" in missing.stderr
        bad = local("create", "ev3", "--restart", "sometimes")
        assert bad.exit_code == 2 and "sometimes" in bad.stderr
    finally:
        for name in ("ev1", "ev2"):
            local("delete", name, "--yes")


def test_follow_prints_new_events(local, home, agent):
    ensure_test_image(local)
    assert local("create", "evf", "--image", "test", "--memory", "256M", "--no-start",
                 "--ssh-key", _key(home)).exit_code == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmctl", "events", "evf", "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "VMCTL_AGENT": agent.unix})
    try:
        first = _line(proc, 30)
        assert "create by " in first, first
        assert local("push-config", "evf", "--memory", "320M").exit_code == 0
        assert "push_config by " in _line(proc, 30)
    finally:
        proc.kill()                      # the one we started, by its Popen
        proc.wait()
        local("delete", "evf", "--yes")


def _line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            return proc.stdout.readline()
        assert proc.poll() is None, proc.stderr.read()
    raise AssertionError("no line from vmctl events --follow")
