"""The audit log: every operation that changes something, as one JSON line (time, user,
role, transport, operation, target, result, error) in ``STATE_DIR/audit.log`` (0600),
rotated by size (``audit.log.1`` ... ``.N``). Written by a guard around every request
(:mod:`vmagent.api.dispatch`), refusals included."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

from vmagent.api.dispatch import Guard, target_of
from vmagent.context import RequestContext
from vmagent.errors import VMAgentError
from vmagent.ops import Operation
from vmagent.spec import parse_offset_tail

log = logging.getLogger(__name__)

FILE = "audit.log"
MAX_BYTES = 10 << 20
KEEP = 3


class AuditLog:
    def __init__(self, state_dir: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.path = Path(state_dir) / FILE
        self.max_bytes = max_bytes
        self.keep = keep

    def _rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{FILE}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{FILE}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{FILE}.1"))

    def write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        try:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:     # a full disk must not make every operation fail
            log.error("audit log %s: %s", self.path, e)

    def record(self, op: Operation, ctx: RequestContext, params: dict[str, Any],
               result: str, error: VMAgentError | None = None) -> None:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) +
            f".{int(time.time() * 1000) % 1000:03d}Z",
            "user": ctx.caller.user, "role": ctx.caller.role.value,
            "transport": ctx.transport.value, "operation": op.name,
            "target": {"kind": op.target, "name": target_of(op, params)},
            "result": result, "error": None, "request": ctx.request_id,
            "seconds": round(time.monotonic() - ctx.started, 3)}
        if params.get("dry_run") in (True, "true"):
            entry["dry_run"] = True
        if ctx.caller.token_id:
            entry["token"] = ctx.caller.token_id
        if error is not None:
            entry["error"] = {"code": error.code, "message": error.message}
        self.write(entry)

    def read(self, offset: int = 0, tail: int | None = None,
             limit: int = 1 << 20) -> dict[str, Any]:
        """Lines from byte ``offset`` on (``tail``: the last bytes), whole lines only."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return {"offset": 0, "size": 0, "entries": []}
        if offset > size:           # rotated since: start over
            offset = 0
        if tail is not None:
            offset = max(0, size - tail)
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
        if offset and tail is not None:   # skip the partial first line of a tail
            cut = data.find(b"\n")
            offset, data = offset + cut + 1, data[cut + 1:]
        end = data.rfind(b"\n") + 1
        entries = []
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return {"offset": offset + end, "size": size, "entries": entries}


def audit_guard(audit: AuditLog) -> Guard:
    @contextlib.asynccontextmanager
    async def guard(op: Operation, ctx: RequestContext,
                    params: dict[str, Any]) -> AsyncIterator[None]:
        if not op.mutates:
            yield
            return
        try:
            yield
        except VMAgentError as e:
            audit.record(op, ctx, params, "refused" if e.status in (401, 403) else "error",
                         e)
            raise
        except BaseException as e:
            err = VMAgentError(f"{type(e).__name__}: {e}")
            audit.record(op, ctx, params, "error", err)
            raise
        audit.record(op, ctx, params, "ok")
    return guard


class AuditService:
    """The ``host_log`` operation."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    async def read(self, ctx: RequestContext, offset: Any = 0, tail: Any = None) -> dict:
        return self.audit.read(*parse_offset_tail(offset, tail))
