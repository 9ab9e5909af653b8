"""End to end on the test image under TCG: create (waits for SSH), ssh (also tunnelled
through a remote-style ssh:// agent address), console, delete. Slow: integration."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from cli_helpers import (ROOT, SSHD, agent, ensure_test_image, home, local,  # noqa: F401
                         run, ssh_address, ssh_home, sshd)
from vmctl import vmssh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
NAME = "e2e1"


def _console_shows_login(env: dict, name: str, timeout: float = 120) -> tuple[bytes, int]:
    """Run ``vmctl console NAME`` on a pty, press Enter until a login prompt shows, then
    detach with Ctrl-]. Returns (what the terminal showed, exit status)."""
    pid, fd = pty.fork()
    if pid == 0:                                 # child: the real CLI on a terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "vmctl", "console", name], env)
    seen = b""
    deadline = time.monotonic() + timeout
    next_enter = 0.0
    try:
        while time.monotonic() < deadline and b"login:" not in seen:
            if time.monotonic() >= next_enter:
                os.write(fd, b"\r")
                next_enter = time.monotonic() + 3
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        os.write(fd, b"\x1d")
        end = time.monotonic() + 15
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return seen, os.waitstatus_to_exitcode(status)


def test_create_ssh_console_delete(local, run, agent, home, sshd, ssh_home):
    ensure_test_image(local)
    created = local("--json", "create", NAME, "--image", "test", "--memory", "1G",
                    "--timeout", "1200")
    assert created.exit_code == 0, created.stderr
    status = json.loads(created.stdout)
    try:
        assert status["state"] == "running" and status["ssh_ready"]
        # progress lines on stderr, one per phase when it happened: ready when a login
        # works (the agent made the host keys: cloud-init's end is not waited for)
        lines = [ln.split(":", 1)[1].rsplit(None, 1)[0].strip()
                 for ln in created.stderr.splitlines() if ln.startswith(f"{NAME}: ")]
        assert lines[:5] == ["image ready", "disk created", "seed written", "qemu started",
                             "kernel started"], created.stderr
        assert lines[5:] == ["SSH answers", "SSH login works"], created.stderr

        uname = local("ssh", NAME, "--", "uname", "-r")
        assert uname.exit_code == 0, uname.stderr
        assert re.fullmatch(r"\d+\.\d+\.\d+\S*\n", uname.stdout), uname.stdout
        failing = local("ssh", NAME, "--", "exit", "7")
        assert failing.exit_code == 7

        # the vmctl known_hosts has the VM's keys, pinned from the console log
        from vmctl.address import resolve
        from vmctl.config import load
        target = resolve(None, load())
        alias = vmssh.host_key_alias(target, status)
        assert subprocess.run(["ssh-keygen", "-F", alias, "-f",
                               str(vmssh.known_hosts_file())],
                              capture_output=True).returncode == 0

        # a remote agent: ssh goes through ProxyCommand=vmctl proxy (tunnel websocket)
        remote = run("--host", ssh_address(sshd, agent), "ssh", NAME, "--", "uname", "-r")
        assert remote.exit_code == 0, remote.stderr
        assert remote.stdout == uname.stdout
        assert run("--host", ssh_address(sshd, agent), "ssh", NAME, "--", "exit 3"
                   ).exit_code == 3

        assert local("wait", NAME, "--timeout", "60").exit_code == 0

        env = {**os.environ, "TERM": "xterm"}
        screen, code = _console_shows_login(env, NAME)
        assert b"login:" in screen, screen[-2000:]
        assert code == 0 and b"detached" in screen

        log = local("console", NAME, "--log", "--tail", "65536")
        assert "login:" in log.stdout

        snap = local("-q", "snapshot", NAME, "--name", "s1")
        assert snap.exit_code == 0 and snap.stdout == "s1\n", snap.stderr
        snaps = json.loads(local("--json", "snapshots", NAME).stdout)["snapshots"]
        assert [s["name"] for s in snaps] == ["s1"]
        stopped = local("stop", NAME, "--timeout", "120")
        assert stopped.exit_code == 0, stopped.stderr
        assert stopped.stdout.startswith(f"{NAME}: stopped")
        assert local("ssh", NAME, "--", "true").exit_code == 4
    finally:
        deleted = local("--json", "delete", NAME, "--yes")
    assert deleted.exit_code == 0, deleted.stderr
    assert local("show", NAME).exit_code == 3
    assert not (agent.state_dir / "vms" / NAME).exists()
    procs = subprocess.run(["pgrep", "-f", f"-name {NAME},"], capture_output=True, text=True)
    assert procs.stdout.strip() == ""
