"""Operations by name and result, with their latencies: a guard (:mod:`.dispatch`) that
times every call of every row, whatever the transport, into a histogram per (operation,
result); the metrics (``vmagent/monitor/metrics.py``) export them. ``result`` is ``ok``
or the error's code (``not_found``, ``conflict``, ...; ``internal`` for a bug); a stream
row counts the opening of its stream."""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator

from vmagent.api.dispatch import Guard, outcome
from vmagent.context import RequestContext
from vmagent.monitor.model import Histogram
from vmagent.ops import Operation


class OpStats:
    def __init__(self) -> None:
        self.histograms: dict[tuple[str, str], Histogram] = {}

    def record(self, op: str, result: str, seconds: float) -> None:
        self.histograms.setdefault((op, result), Histogram()).observe(seconds)

    def guard(self) -> Guard:
        @contextlib.asynccontextmanager
        async def guard(op: Operation, ctx: RequestContext,
                        params: dict[str, Any]) -> AsyncIterator[None]:
            t0 = time.monotonic()
            async with outcome(lambda result: self.record(op.name, result,
                                                          time.monotonic() - t0)):
                yield
        return guard
