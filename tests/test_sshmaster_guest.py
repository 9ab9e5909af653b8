"""One login per boot with a real guest (a warm clone of the session template): the
readiness login of ``vmctl create`` leaves an SSH master that ``vmctl ssh`` reuses (a
channel, not a login: one sshd connection process in the guest serves the sessions),
``vmctl ssh`` still works once the master is killed (a new login, the new master),
``vmctl reboot`` closes it and the new boot gets another, ``vmctl delete`` closes it.
Integration: starts qemu."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agent_helpers import ROOT
from vmctl import sshmaster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
NAME = "mux1"


@pytest.fixture
def env(session_agent, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    shutil.copy(session_agent.key, home / ".ssh" / "id_ed25519")
    shutil.copy(session_agent.key.with_suffix(".pub"), home / ".ssh" / "id_ed25519.pub")
    runtime = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMCTL_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_RUNTIME_DIR=str(runtime), VMCTL_AGENT=session_agent.unix,
               PYTHONPATH=str(ROOT))
    yield env
    for sock in (runtime / "vmctl" / "ssh").glob("*"):
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                       capture_output=True)
    shutil.rmtree(runtime, ignore_errors=True)


def vmctl(env, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmctl", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout)


def sockets(env) -> list[Path]:
    return sorted((Path(env["XDG_RUNTIME_DIR"]) / "vmctl" / "ssh").glob("*"))


def timed(env, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = vmctl(env, *args, timeout=120)
    return proc, time.monotonic() - start


def session_parent(env) -> tuple[str, float]:
    """(the pid of the guest's sshd process serving this session's connection, the
    seconds ``vmctl ssh`` took): two sessions of one login have the same."""
    proc, took = timed(env, "ssh", NAME, "--", "echo $PPID")
    assert proc.returncode == 0 and proc.stdout.strip().isdigit(), proc.stderr
    return proc.stdout.strip(), took


def test_create_leaves_a_master_that_ssh_reuses_and_replaces(env, session_agent,
                                                            session_template):
    created = vmctl(env, "--json", "create", NAME, "--template", session_template)
    assert created.returncode == 0, created.stderr
    try:
        status = json.loads(created.stdout)
        assert status["boot_id"] and status["instance_id"]
        [path] = sockets(env)                  # the readiness login made it
        assert sshmaster.check(path)
        master = sshmaster.master_pid(path)
        # two sessions: channels of the connection the readiness login opened (the
        # master that create started serves them: one sshd process in the guest)
        (first, t_channel), (second, _) = session_parent(env), session_parent(env)
        assert first == second
        assert sshmaster.master_pid(path) == master
        # the master is gone (killed: its socket stays behind, dead)
        os.kill(master, 9)
        c, t_login = timed(env, "ssh", NAME, "--", "echo", "still")
        assert c.returncode == 0 and c.stdout == "still\n", c.stderr
        new = sshmaster.master_pid(path)        # that login is the new master
        assert new not in (None, master)
        third, _ = session_parent(env)
        assert third != first                   # another connection: a new login
        assert sshmaster.master_pid(path) == new
        print(f"\nvmctl ssh NAME -- echo through the master: {t_channel:.2f}s; "
              f"with a login: {t_login:.2f}s")
        assert t_channel < t_login
        # password logins are off (the seed's sshd drop-in, not cloud-init's ssh_pwauth)
        conf = vmctl(env, "ssh", NAME, "--", "sudo sshd -T", timeout=120)
        assert "passwordauthentication no" in conf.stdout, conf.stderr
        # a reboot through vmctl closes the master; the new boot gets its own
        rebooted = vmctl(env, "reboot", NAME, timeout=600)
        assert rebooted.returncode == 0, rebooted.stderr
        assert sockets(env) == [] and not sshmaster.check(path)
        waited = vmctl(env, "--json", "wait", NAME, "--timeout", "900", timeout=960)
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["boot_id"] != status["boot_id"]
        [after] = sockets(env)
        assert after != path and sshmaster.check(after)
        fourth, _ = session_parent(env)
        assert fourth != third
    finally:
        deleted = vmctl(env, "delete", NAME, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert sockets(env) == []                  # delete closed it
