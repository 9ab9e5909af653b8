"""The ``events`` operation: a VM's event log (:mod:`vmagent.vms.events`), newest last."""

from __future__ import annotations

from typing import Any

from vmagent.context import RequestContext
from vmagent.errors import BadRequest
from vmagent.vms.registry import VMRegistry

MAX_LIMIT = 1000


class History:
    def __init__(self, registry: VMRegistry) -> None:
        self.registry = registry

    async def events(self, ctx: RequestContext, name: str, limit: Any = 100,
                     since: Any = None) -> dict:
        """The last ``limit`` events; with ``since`` (epoch seconds), only those after
        it (``vmctl events --follow`` asks with the time of the last one it has)."""
        vm = self.registry.get(name)
        try:
            n = int(limit if limit not in (None, "") else 100)
        except (TypeError, ValueError):
            raise BadRequest("limit must be a whole number") from None
        if not 1 <= n <= MAX_LIMIT:
            raise BadRequest(f"limit: from 1 to {MAX_LIMIT}")
        try:
            after = None if since in (None, "") else float(since)
        except (TypeError, ValueError):
            raise BadRequest("since: expected epoch seconds") from None
        events = vm.event_log.read(MAX_LIMIT if after is not None else n)
        if after is not None:
            events = [e for e in events if e.get("time", 0) > after][-n:]
        return {"name": vm.name, "events": events}
