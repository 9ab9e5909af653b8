"""Waiting for something to become true: one deadline loop for the whole agent."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Awaitable, Callable, TypeVar

from vmagent.errors import Timeout, VMAgentError

T = TypeVar("T")


async def poll_until(check: Callable[[], T | Awaitable[T]], timeout: float, *,
                     interval: float = 0.1, max_interval: float | None = None,
                     error: str | Callable[[], VMAgentError] | None = None) -> T | None:
    """Call ``check`` (a function or coroutine function) until it returns something
    truthy, and return that. ``interval`` doubles after every try up to
    ``max_interval`` (default: no growth). After ``timeout`` seconds: raise
    :class:`Timeout` with ``error`` (a message, or a function making the error), or
    return the last (falsy) result when ``error`` is None. ``check`` raises to give up
    early (the process it waits for is gone, ...)."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            if error is None:
                return result
            raise Timeout(error) if isinstance(error, str) else error()
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())) or 0)
        if max_interval is not None:
            delay = min(delay * 2, max_interval)
