"""Operations in the VMs' event logs: a guard (:mod:`.dispatch`) that appends, after
every operation that changes a named VM, an ``operation`` event (who, what, the result)
to that VM's ``events.jsonl``, whatever the transport; ``vmctl events`` shows them
among the state changes they caused. A create is logged once the VM exists; a delete
leaves no log to write to."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Callable

from vmagent.api.dispatch import Guard, outcome, target_of
from vmagent.context import RequestContext
from vmagent.ops import Operation
from vmagent.vms.events import EventLog

# the event log of the VM by name (None: no such VM)
LogOf = Callable[[str], "EventLog | None"]


def operation_events_guard(log_of: LogOf) -> Guard:
    @contextlib.asynccontextmanager
    async def guard(op: Operation, ctx: RequestContext,
                    params: dict[str, Any]) -> AsyncIterator[None]:
        name = target_of(op, params) if op.target == "vm" and op.mutates else None
        if name is None or op.websocket or params.get("dry_run"):
            yield
            return

        def ended(result: str) -> None:
            log = log_of(name)
            if log is not None:
                log.append("operation", op=op.name, user=ctx.caller.user, result=result)

        async with outcome(ended):
            yield
    return guard
