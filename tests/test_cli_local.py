"""The per-user agent (vmctl --local): started on demand with its state under the
user's data dir and its socket under the runtime dir, reused, shown by host list; a
user who is not root and finds no system agent is offered it."""

from __future__ import annotations

import json
import os
import signal

import pytest

from cli_helpers import home, run  # noqa: F401
from vmctl import localagent
from vmctl.errors import CLIError


@pytest.fixture
def local_env(home, tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    p = localagent.paths()
    yield p
    # stop the agent this test started (its pid from its lock holder: the socket's peer)
    if localagent.answers(p.socket):
        import socket as s_
        import struct
        with s_.socket(s_.AF_UNIX) as s:
            s.connect(str(p.socket))
            pid = struct.unpack("3i", s.getsockopt(s_.SOL_SOCKET, s_.SO_PEERCRED,
                                                   struct.calcsize("3i")))[0]
        os.kill(pid, signal.SIGTERM)


def test_local_starts_a_per_user_agent_and_reuses_it(run, local_env):
    first = run("--local", "--json", "host", "show")
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["state_dir"] == str(local_env.state_dir)
    assert "starting your local agent" in first.stderr
    assert local_env.socket.parent.stat().st_mode & 0o777 == 0o700   # the user's only
    again = run("host", "show", "--json", "--local")
    assert again.exit_code == 0 and "starting" not in again.stderr
    listed = json.loads(run("--json", "host", "list", "--local").stdout)["hosts"]
    assert "local-user" in [h["name"] for h in listed]
    assert run("--local", "-H", "x", "list").exit_code == 2


def test_a_user_is_offered_the_local_agent(local_env, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    said = []
    with pytest.raises(CLIError, match="vmctl --local"):
        localagent.offer("/nonexistent.sock", local_env, False, said.append, lambda q: True)
    with pytest.raises(CLIError, match="not started"):
        localagent.offer("/nonexistent.sock", local_env, True, said.append, lambda q: False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert localagent.offer("/nonexistent.sock", local_env, True, said.append,
                            lambda q: True) is False        # root: the system agent's
