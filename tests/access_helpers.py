"""Real people for the access tests: local users made with ``useradd`` (removed after
the module), an agent whose socket they can reach through its group, a stdlib-only
HTTP client run *as* them (``/usr/bin/python3``: root's Python is not theirs to run),
and a private sshd that lets them log in with their own keys."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent_helpers import AgentProcess, free_port, keypair

SYSTEM_PYTHON = "/usr/bin/python3"
GROUP = "vmagent-acctest"
OPERATORS = "vmagent-acctest-ops"

# one request on a unix socket, run as another user; prints "STATUS JSON"
CLIENT = r"""
import http.client, json, socket, sys
path, method, url, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.settimeout(60)
        self.sock.connect(path)
c = C("vmagent", timeout=60)
c.request(method, url, body=body.encode() if body else None,
          headers={"Content-Type": "application/json"} if body else {})
r = c.getresponse()
sys.stdout.write(f"{r.status} {r.read().decode()}")
"""


def ensure_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", name], check=True)


class People:
    """Local users made for a test module, with their SSH keys."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.made: list[str] = []
        self.keys: dict[str, Path] = {}

    def add(self, name: str, *groups: str) -> Path:
        try:
            pwd.getpwnam(name)
        except KeyError:
            # no password, but not locked ("!"): sshd refuses locked accounts
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", "-p", "*", name], check=True)
            self.made.append(name)
        if groups:
            subprocess.run(["usermod", "-aG", ",".join(groups), name], check=True)
        key = keypair(self.base, f"{name}_key")
        self.keys[name] = key
        return key

    def pub(self, name: str) -> str:
        return self.keys[name].with_suffix(".pub").read_text().strip()

    def remove(self) -> None:
        for name in self.made:
            subprocess.run(["userdel", "-r", name], capture_output=True)


class SharedAgent(AgentProcess):
    """An agent whose socket local users can reach: in a directory they may traverse,
    owned by a group they are in (``--socket-group``)."""

    def __init__(self, base: Path, *extra: str, token: str | None = None) -> None:
        self.sock_dir = Path(tempfile.mkdtemp(prefix="vmagent-acc-", dir="/tmp"))
        os.chmod(self.sock_dir, 0o711)
        super().__init__(base / "state", "--socket", str(self.sock_dir / "agent.sock"),
                         "--socket-group", GROUP, "--operator-group", OPERATORS, *extra,
                         token=token)
        self.socket = self.sock_dir / "agent.sock"

    def as_user(self, user: str, method: str, path: str,
                body: dict | None = None) -> tuple[int, dict]:
        """One request on the socket from a process of ``user``."""
        res = subprocess.run(
            [SYSTEM_PYTHON, "-c", CLIENT, str(self.socket), method, "/v1" + path,
             json.dumps(body) if body is not None else ""],
            user=user, group=pwd.getpwnam(user).pw_gid, extra_groups=_groups(user),
            capture_output=True, text=True, timeout=120, cwd="/")
        assert res.returncode == 0, res.stderr
        status, _, doc = res.stdout.partition(" ")
        return int(status), json.loads(doc or "{}")

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def _groups(user: str) -> list[int]:
    return [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
