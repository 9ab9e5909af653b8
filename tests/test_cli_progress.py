"""wait_ready: the readiness rules, driven by a scripted sequence of statuses."""

from __future__ import annotations

import pytest

from vmctl.errors import CLIError
from vmctl.progress import Progress, wait_ready


def _status(**kw):
    base = {"name": "v", "state": "running", "ssh_ready": False, "cloud_init": None,
            "boot": {"kernel": False}}
    return {**base, **kw}


def _driver(statuses):
    seq = list(statuses)

    def call(op, **params):
        if op == "console_log":
            return {"offset": 10, "data": "\x1b[0;32m OK \x1b[0m Started ssh.service\r\n"}
        return seq.pop(0) if len(seq) > 1 else seq[0]
    return call


def test_waits_for_cloud_init_before_logging_in():
    logins = []
    call = _driver([
        _status(),
        _status(boot={"kernel": True}),
        _status(boot={"kernel": True}, cloud_init="running", ssh_ready=True),
        _status(boot={"kernel": True}, cloud_init="running", ssh_ready=True),
        _status(boot={"kernel": True}, cloud_init="done", ssh_ready=True),
    ])

    def login(status):
        logins.append(status["cloud_init"])
        return True, ""
    progress = Progress("v", enabled=False)
    status = wait_ready(call, "v", progress, timeout=30, login=login, poll=0)
    assert status["cloud_init"] == "done"
    assert logins == ["done"]
    assert list(progress.reached) == ["image", "disk", "seed", "qemu", "kernel",
                                      "cloud_init", "ssh"]
    assert progress.last_line == "OK  Started ssh.service"


def test_retries_login_until_it_works(monkeypatch):
    results = iter([(False, "Permission denied"), (True, "")])
    call = _driver([_status(ssh_ready=True, cloud_init="done")])
    clock = iter(range(0, 1000, 3))
    monkeypatch.setattr("vmctl.progress.time.monotonic", lambda: next(clock))
    status = wait_ready(call, "v", Progress("v", enabled=False), timeout=100,
                        login=lambda st: next(results), poll=0)
    assert status["ssh_ready"]


def test_broken_vm_is_a_qemu_failure():
    call = _driver([_status(state="broken", reason="qemu exited with 1")])
    with pytest.raises(CLIError) as info:
        wait_ready(call, "v", Progress("v", enabled=False), timeout=5, login=None, poll=0)
    assert info.value.exit_code == 7 and "qemu exited with 1" in info.value.message


def test_stopped_vm_is_a_conflict():
    call = _driver([_status(state="stopped")])
    with pytest.raises(CLIError) as info:
        wait_ready(call, "v", Progress("v", enabled=False), timeout=5, login=None, poll=0)
    assert info.value.exit_code == 4


def test_timeout_says_what_it_waited_for():
    call = _driver([_status(boot={"kernel": True}, cloud_init="running", ssh_ready=True)])
    with pytest.raises(CLIError) as info:
        wait_ready(call, "v", Progress("v", enabled=False), timeout=0.01,
                   login=lambda st: (True, ""), poll=0.005)
    assert info.value.exit_code == 5
    assert "SSH ready" in info.value.message and "cloud-init is still running" in \
        info.value.message
