"""What each VM is doing: a guard (:mod:`vmagent.api.dispatch`) that records, for every
operation that changes a named VM, that it runs (``busy``) and how the last one ended
(``last``), whatever the transport. The web UI shows it ("stopping" while a reboot
runs, "starting" until the new boot's SSH answers); it is kept in memory only.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator

from vmagent.api.dispatch import Guard, target_of
from vmagent.context import RequestContext
from vmagent.ops import Operation


class Activity:
    def __init__(self) -> None:
        self._busy: dict[str, list[str]] = {}
        self._last: dict[str, dict[str, Any]] = {}

    def of(self, name: str) -> dict[str, Any]:
        """``{"busy": operation or None, "last": {"op", "ended", "ok"} or None}``;
        ``ended`` is a wall-clock time."""
        busy = self._busy.get(name)
        return {"busy": busy[0] if busy else None, "last": self._last.get(name)}

    def guard(self) -> Guard:
        @contextlib.asynccontextmanager
        async def guard(op: Operation, ctx: RequestContext,
                        params: dict[str, Any]) -> AsyncIterator[None]:
            name = target_of(op, params) if op.target == "vm" and op.mutates else None
            if name is None or op.websocket:
                yield
                return
            self._busy.setdefault(name, []).append(op.name)
            ok = False
            try:
                yield
                ok = True
            finally:
                running = self._busy.get(name, [])
                if op.name in running:
                    running.remove(op.name)
                if not running:
                    self._busy.pop(name, None)
                if op.name == "delete" and ok:
                    self._last.pop(name, None)
                else:
                    self._last[name] = {"op": op.name, "ended": time.time(), "ok": ok}
        return guard
