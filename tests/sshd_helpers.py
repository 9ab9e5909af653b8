"""A private sshd on 127.0.0.1 for the SSH transport tests: each user logs in with
their own key."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent_helpers import free_port

SSHD = Path("/usr/sbin/sshd")


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True)
    return path.with_suffix(".pub").read_text().strip()


def start_sshd(users_keys: dict[str, str]) -> tuple[subprocess.Popen, int, str, Path]:
    """A private sshd on 127.0.0.1 where each user logs in with their own key (its
    directory is outside root's private /tmp/pytest-of-root: sshd reads a user's keys
    as that user). Returns (process, port, host public key, directory)."""
    d = Path(tempfile.mkdtemp(prefix="vmagent-sshd-", dir="/tmp"))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(d / "host_key")], check=True)
    for user, pub in users_keys.items():
        (d / f"{user}.keys").write_text(pub + "\n")
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o600 if f.name == "host_key" else 0o644)
    port = free_port()
    (d / "sshd_config").write_text(f"""
Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile none
AuthorizedKeysFile {d}/%u.keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
""")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")],
                            stderr=open(d / "sshd.log", "wb"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
    return proc, port, (d / "host_key.pub").read_text().strip(), d
