"""wait_ready: the readiness rules, driven by a scripted sequence of statuses."""

from __future__ import annotations

import pytest

from vmctl.errors import CLIError
from vmctl.progress import PHASES, Progress, wait_ready


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


def _recording(statuses):
    """A driver that also records, at each status call, which phases were done."""
    call = _driver(statuses)
    seen = []

    def recording(op, **params):
        doc = call(op, **params)
        if op == "status":
            seen.append((doc, set(progress.reached)))
        return doc
    progress = Progress("v", enabled=False)
    return recording, progress, seen


KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1 root@v"]


def test_ready_when_a_login_works_while_cloud_init_still_runs():
    """With the agent's host keys, a login is tried as soon as SSH answers: ready then,
    cloud-init's end is neither waited for nor shown."""
    logins = []
    call, progress, _ = _recording([
        _status(boot={"kernel": True}),
        _status(boot={"kernel": True}, cloud_init="running", ssh_ready=True,
                ssh_host_keys=KEYS),
    ])

    def login(status):
        logins.append(status["cloud_init"])
        return True, ""
    status = wait_ready(call, "v", progress, timeout=30, login=login, poll=0)
    assert status["cloud_init"] == "running" and logins == ["running"]
    assert list(progress.reached) == ["image", "disk", "seed", "qemu", "kernel", "ssh",
                                      "login"]
    assert "cloud_init" not in dict(progress.phases) and not progress.skipped


def test_cloud_init_waited_for_when_asked_after_the_login():
    logins = []
    call = _driver([_status(cloud_init="running", ssh_ready=True, ssh_host_keys=KEYS)] * 3
                   + [_status(cloud_init="done", ssh_ready=True, ssh_host_keys=KEYS)])
    progress = Progress("v", enabled=False, cloud_init=True)

    def login(status):
        logins.append(status["cloud_init"])
        return True, ""
    wait_ready(call, "v", progress, timeout=30, login=login, poll=0, cloud_init=True)
    assert logins == ["running"]                       # once, as soon as SSH answered
    assert list(progress.reached)[-2:] == ["login", "cloud_init"]


def test_no_login_is_ready_when_ssh_answers_or_cloud_init_finished_when_asked():
    call = _driver([_status(cloud_init="running", ssh_ready=True)])
    progress = Progress("v", enabled=False, login=False)
    wait_ready(call, "v", progress, timeout=30, login=None, poll=0)
    assert list(progress.reached)[-1] == "ssh"
    call = _driver([_status(cloud_init="running", ssh_ready=True)] * 2 +
                   [_status(cloud_init="done", ssh_ready=True)])
    progress = Progress("v", enabled=False, login=False, cloud_init=True)
    status = wait_ready(call, "v", progress, timeout=30, login=None, poll=0,
                        cloud_init=True)
    assert status["cloud_init"] == "done" and list(progress.reached)[-1] == "cloud_init"


def test_without_the_agents_host_keys_cloud_init_comes_first():
    """Host keys the guest made are pinned from the console, where cloud-init prints
    them at its end: the login waits for it, and the display shows it first."""
    logins = []
    call, progress, seen = _recording([
        _status(),
        _status(boot={"kernel": True}),
        _status(boot={"kernel": True}, cloud_init="running", ssh_ready=True),
        _status(boot={"kernel": True}, cloud_init="running", ssh_ready=True),
        _status(boot={"kernel": True}, cloud_init="done", ssh_ready=True),
    ])

    def login(status):
        logins.append(status["cloud_init"])
        return True, ""
    status = wait_ready(call, "v", progress, timeout=30, login=login, poll=0)
    assert status["cloud_init"] == "done"
    assert logins == ["done"]
    assert list(progress.reached) == ["image", "disk", "seed", "qemu", "kernel", "ssh",
                                      "cloud_init", "login"]
    assert [k for k, _ in progress.phases][-2:] == ["cloud_init", "login"]
    assert progress.last_line == "OK  Started ssh.service"
    # what was done after each status (recorded when the next one was asked for):
    # nothing before the status said it happened
    after = [(doc, done_next) for (doc, _), (_, done_next) in zip(seen, seen[1:])]
    assert after[0][1] == {"image", "disk", "seed", "qemu"}     # no kernel banner yet
    assert after[1][1] == {"image", "disk", "seed", "qemu", "kernel"}
    running = [done for doc, done in after if doc["cloud_init"] == "running"]
    assert len(running) == 2 and all("ssh" in done and "cloud_init" not in done and
                                     "login" not in done for done in running)


def test_phases_are_named_by_what_they_wait_for():
    labels = [label for _, label in PHASES]
    assert "cloud-init finished" in labels and "SSH answers" in labels
    assert not [lb for lb in labels if lb.endswith(("running", "booting", "ready "))]
    assert Progress("v", enabled=False, cloud_init=True).phases == PHASES
    assert [k for k, _ in Progress("v", enabled=False).phases] == [
        "image", "disk", "seed", "qemu", "kernel", "ssh", "login"]
    assert [k for k, _ in Progress("v", enabled=False, login=False).phases][-1] == "ssh"


def test_cloud_init_is_done_only_when_it_finished(capsys):
    """The plain (not live) display prints a phase when it is reached: while the status
    says cloud-init is running, "cloud-init finished" is not printed."""
    statuses = [_status(boot={"kernel": True}, cloud_init="running", ssh_ready=True)] * 3 \
        + [_status(boot={"kernel": True}, cloud_init="done", ssh_ready=True)]
    call = _driver(statuses)
    printed_while_running = []

    def spy(op, **params):
        doc = call(op, **params)
        if op == "status" and doc["cloud_init"] == "running":
            printed_while_running.append(capsys.readouterr().err)
        return doc
    wait_ready(spy, "v", Progress("v", live=False), timeout=30,
               login=lambda st: (True, ""), poll=0)
    assert printed_while_running and "cloud-init finished" not in \
        "".join(printed_while_running)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(":", 1)[1].rsplit(None, 1)[0].strip() for ln in lines] == \
        ["cloud-init finished", "SSH login works"]


def test_a_guest_without_cloud_init_says_so():
    call = _driver([_status(boot={"kernel": True}, ssh_ready=True)])
    progress = Progress("v", enabled=False)
    wait_ready(call, "v", progress, timeout=30, login=lambda st: (True, ""), poll=0)
    assert "cloud_init" not in progress.reached
    assert progress.skipped == {"cloud_init": "not seen on the console"}
    assert "login" in progress.reached


def test_retries_login_until_it_works(monkeypatch):
    attempts = []

    def login(status):
        attempts.append(status["name"])
        return (False, "Permission denied") if len(attempts) == 1 else (True, "")
    call = _driver([_status(ssh_ready=True, cloud_init="done")])
    clock = iter(range(0, 1000, 3))
    monkeypatch.setattr("vmctl.progress.time.monotonic", lambda: next(clock))
    progress = Progress("v", enabled=False)
    wait_ready(call, "v", progress, timeout=100, login=login, poll=0)
    assert attempts == ["v", "v"]                      # failed once, then logged in
    assert "login" in progress.reached and progress.note == ""


def test_gives_up_when_login_never_works(monkeypatch):
    call = _driver([_status(ssh_ready=True, cloud_init="done")])
    clock = iter(range(0, 1000, 3))
    monkeypatch.setattr("vmctl.progress.time.monotonic", lambda: next(clock))
    with pytest.raises(CLIError) as info:
        wait_ready(call, "v", Progress("v", enabled=False), timeout=20,
                   login=lambda st: (False, "Permission denied (publickey)"), poll=0)
    assert info.value.exit_code == 5
    assert "waiting for: SSH login works" in info.value.message
    assert "Permission denied (publickey)" in info.value.message


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
    assert "waiting for: cloud-init finished" in info.value.message
    assert "cloud-init is still running" in info.value.message
