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

    async def events(self, ctx: RequestContext, name: str, limit: Any = 100) -> dict:
        vm = self.registry.get(name)
        try:
            n = int(limit if limit not in (None, "") else 100)
        except (TypeError, ValueError):
            raise BadRequest("limit must be a whole number") from None
        if not 1 <= n <= MAX_LIMIT:
            raise BadRequest(f"limit: from 1 to {MAX_LIMIT}")
        return {"name": vm.name, "events": vm.event_log.read(n)}
