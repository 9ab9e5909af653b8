"""A per-user agent, for a machine where no system agent runs (the way Lima starts its
host agent): state under ``$XDG_DATA_HOME/vmagent`` (``~/.local/share/vmagent``), the
socket under the user's runtime dir (``$XDG_RUNTIME_DIR/vmagent/``, else
``/tmp/vmagent-UID/``), the log beside the state. ``vmctl --local`` uses it (and starts
it when it does not run); without ``--local``, a user who is not root and finds no
agent at the default socket is offered it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CLIError, Unreachable

START_TIMEOUT = 60.0


@dataclass(frozen=True)
class LocalPaths:
    state_dir: Path
    socket: Path
    log: Path


def paths(env: dict[str, str] | None = None) -> LocalPaths:
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    data = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else home / ".local/share"
    state = data / "vmagent"
    runtime = env.get("XDG_RUNTIME_DIR")
    sock_dir = Path(runtime) / "vmagent" if runtime else Path(f"/tmp/vmagent-{os.getuid()}")
    return LocalPaths(state, sock_dir / "vmagent.sock", state / "agent.log")


def answers(path: Path) -> bool:
    """An agent listens on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def start(p: LocalPaths, say=lambda text: None) -> None:
    """Start the per-user agent in the background and wait until it answers."""
    p.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    p.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(p.socket.parent, 0o700)
    say(f"starting your local agent: state {p.state_dir}, socket {p.socket}, log {p.log}")
    log = open(p.log, "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmagent.cli", "serve", "--state-dir", str(p.state_dir),
             "--socket", str(p.socket)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True, close_fds=True)
    finally:
        log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while not answers(p.socket):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = p.log.read_text(errors="replace").strip().splitlines()[-5:] \
                if p.log.exists() else []
            raise Unreachable(f"the local agent did not start (see {p.log}): "
                              + (" | ".join(tail) or "no output"))
        time.sleep(0.1)


def ensure(p: LocalPaths, say=lambda text: None) -> None:
    if not answers(p.socket):
        start(p, say)


def offer(default_socket: str, p: LocalPaths, interactive: bool, say, ask) -> bool:
    """No agent at ``default_socket``: a user who is not root may use (or start) their
    local agent. True when the command should go to it."""
    if os.geteuid() == 0:
        return False
    if answers(p.socket):
        say(f"no agent at {default_socket}; using your local agent ({p.socket})")
        return True
    if not interactive:
        raise CLIError(f"no agent at {default_socket}: start a per-user agent with "
                       "'vmctl --local ...' (state in ~/.local/share/vmagent), or choose a "
                       "host with --host / VMCTL_AGENT", "unreachable")
    if not ask(f"No agent at {default_socket}. Start a local agent for you (state in "
               f"{p.state_dir})?"):
        raise CLIError("no agent; not started", "unreachable")
    start(p, say)
    return True
