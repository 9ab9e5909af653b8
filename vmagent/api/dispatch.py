"""From an operation of the table to its handler: the one seam every request goes
through, whatever the transport (HTTP, websocket, the web UI, the agent itself).

A handler is ``async def handler(ctx, **params)``; the wiring (:mod:`vmagent.app`)
binds one to every row of ``vmagent/ops.py`` and :class:`Dispatcher` refuses a table
with a row left out. Cross-cutting concerns (the VM lock; later the permission check,
the audit log, metrics) are *guards*: async context managers entered around the handler
in the order given, each deciding from the operation's row what it does, so a new
operation gets all of them without a line of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any, AsyncContextManager, AsyncIterator, Awaitable, Callable, Iterable

from vmagent.context import RequestContext
from vmagent.errors import BadRequest, NoSpace, VMAgentError, is_no_space
from vmagent.ops import BY_NAME, OPERATIONS, Operation

Handler = Callable[..., Awaitable[Any]]
Guard = Callable[[Operation, RequestContext, dict[str, Any]], AsyncContextManager[None]]


class Dispatcher:
    def __init__(self, handlers: dict[str, Handler], guards: Iterable[Guard] = ()) -> None:
        missing = [op.name for op in OPERATIONS if op.name not in handlers]
        unknown = sorted(set(handlers) - set(BY_NAME))
        if missing or unknown:
            raise ValueError(f"handlers do not match the operation table: missing "
                             f"{missing}, not in the table {unknown}")
        self.handlers = dict(handlers)
        self.guards = list(guards)

    async def call(self, op: Operation | str, ctx: RequestContext,
                   params: dict[str, Any] | None = None) -> Any:
        op = BY_NAME[op] if isinstance(op, str) else op
        params = dict(params or {})
        async with contextlib.AsyncExitStack() as stack:
            for guard in self.guards:
                await stack.enter_async_context(guard(op, ctx, params))
            return await self.handlers[op.name](ctx, **params)


def target_of(op: Operation, params: dict[str, Any]) -> str | None:
    """The name of what the operation acts on (None: the host, or a collection)."""
    key = op.target_param
    value = params.get(key) if key else None
    return value if isinstance(value, str) else None


@contextlib.asynccontextmanager
async def outcome(ended: Callable[[str], None]) -> AsyncIterator[None]:
    """Around an operation: ``ended(result)`` once it ends, with ``ok``, the error's
    code, ``cancelled`` or ``internal`` (anything else: a bug)."""
    result = "internal"
    try:
        yield
        result = "ok"
    except VMAgentError as e:
        result = e.code
        raise
    except asyncio.CancelledError:
        result = "cancelled"
        raise
    finally:
        ended(result)


def disk_full_guard(state_dir: Path) -> Guard:
    """Any 'no space left' on the way becomes one clear error with the free bytes."""
    @contextlib.asynccontextmanager
    async def guard(op: Operation, ctx: RequestContext,
                    params: dict[str, Any]) -> AsyncIterator[None]:
        try:
            yield
        except NoSpace:
            raise
        except (OSError, VMAgentError) as e:
            if not is_no_space(e):
                raise
            free = shutil.disk_usage(state_dir).free
            raise NoSpace(f"{op.name}: the state dir's file system is full ({free} bytes "
                          f"free at {state_dir}); nothing was left half-made", free=free,
                          operation=op.name) from e
    return guard


def lock_guard(locked: Callable[[str], AsyncContextManager[None]]) -> Guard:
    """Rows with ``lock`` run under their VM's lock (``locked(name)``)."""
    @contextlib.asynccontextmanager
    async def guard(op: Operation, ctx: RequestContext,
                    params: dict[str, Any]) -> AsyncIterator[None]:
        if not op.lock:
            yield
            return
        name = target_of(op, params)
        if name is None:
            raise BadRequest(f"{op.target_param} is required")
        async with locked(name):
            yield
    return guard
