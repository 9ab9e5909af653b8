"""Warming a pool member's sshd before it is paused.

Under TCG the first SSH connection to a freshly restored clone costs seconds: sshd,
the key exchange, the login and the shell are translated from scratch. TCG keeps its
translations while the VM is paused, so a member that has served one login answers the
taker's first connection at once. The agent logs in once with a throw-away key that
only this member's owner account accepts; the hand-over's re-identification writes the
taker's authorized_keys (every other user's emptied), so the throw-away key is gone
before anybody gets the VM, and its private half is deleted right after the login.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

LOGIN_TIMEOUT = 120.0
# what a CI job's first connection runs: a shell, tar (vmctl run --copy), env
WARM_COMMAND = "cd && tar --version >/dev/null && env >/dev/null && echo warmed"


class Warmup:
    """A throw-away key pair (made before the member, given to its create) and the one
    login through it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vmagent-warmup-"))
        self.key = self.dir / "id"
        self.public: str | None = None

    async def make_key(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmagent-pool-warmup",
            "-f", str(self.key), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise OSError(f"ssh-keygen failed: {err.decode(errors='replace').strip()}")
        self.public = self.key.with_suffix(".pub").read_text().strip()
        return self.public

    async def login(self, user: str, port: int, attempts: int = 2) -> bool:
        """Log in and run :data:`WARM_COMMAND` (twice: the second run is the cheap one
        a taker gets); whether it worked. A failure only costs the taker time."""
        argv = ["ssh", "-i", str(self.key), "-p", str(port), "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=60", "-T", f"{user}@127.0.0.1", WARM_COMMAND]
        ok = False
        for _ in range(attempts):
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            try:
                out, err = await asyncio.wait_for(proc.communicate(), LOGIN_TIMEOUT)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                log.warning("warm-up login to port %d timed out", port)
                return False
            ok = proc.returncode == 0 and b"warmed" in out
            if not ok:
                log.warning("warm-up login to port %d failed (exit %s): %s", port,
                            proc.returncode, err.decode(errors="replace").strip()[-300:])
                return False
        return ok

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
