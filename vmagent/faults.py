"""Fault injection for the reliability tests (tests/test_reliability_*.py):
``VMAGENT_FAULTS=create.staged,delete.marked`` makes the agent kill itself with
SIGKILL when it reaches one of those points, as a power cut or the OOM killer would.
Read once at start-up; without the variable every point is a no-op."""

from __future__ import annotations

import os
import signal

POINTS = {
    "create.staged": "a new VM's run dir is committed; qemu has not been started",
    "create.launched": "qemu of a new VM runs; the create has not answered",
    "start.starting": "the VM is recorded as starting; qemu has not been started",
    "delete.marked": "the VM is recorded as being deleted; its qemu still runs",
    "delete.stopped": "the VM's qemu is gone; its run dir is still there",
}
_ACTIVE = frozenset(p for p in os.environ.get("VMAGENT_FAULTS", "").split(",") if p)
unknown = _ACTIVE - set(POINTS)
if unknown:
    raise SystemExit(f"VMAGENT_FAULTS: unknown point(s) {', '.join(sorted(unknown))}")


def point(name: str) -> None:
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
