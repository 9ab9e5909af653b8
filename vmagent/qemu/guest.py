"""Running programs in a guest through qemu-guest-agent (``guest-exec``)."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

from vmagent.errors import Timeout, VMAgentError
from vmagent.qemu.qmp import Monitor, guest_agent, guest_agent_call


async def guest_exec(qga: Path, name: str, path: str, args: list[str],
                     timeout: float = 60.0, agent_wait: float = 0.0) -> tuple[int, str]:
    """Run a program in the guest through the guest agent; (exit code, output). One
    connection for the start and the polling (each new one costs a ``guest-sync``).
    ``agent_wait``: how long to retry while the guest agent does not answer yet."""
    agent_deadline = time.monotonic() + agent_wait
    while True:
        started = None
        try:
            async with guest_agent(qga, name, timeout=10) as mon:
                started = await mon.execute("guest-exec", {
                    "path": path, "arg": args, "capture-output": True}, 10)
                return await _exec_status(mon, name, path, started["pid"], timeout)
        except VMAgentError as e:
            if started is not None:      # it runs (or ran): never start it twice
                raise
            if time.monotonic() > agent_deadline:
                raise Timeout(f"{name}: the guest agent did not run {path} "
                              f"({e.message})") from e
            await asyncio.sleep(0.05)


async def _exec_status(mon: Monitor, name: str, path: str, pid: int,
                       timeout: float) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        st = await mon.execute("guest-exec-status", {"pid": pid}, 10)
        if st.get("exited"):
            out = base64.b64decode(st.get("out-data", "") or "") + \
                base64.b64decode(st.get("err-data", "") or "")
            return st.get("exitcode", -1), out.decode("utf-8", "replace")
        if time.monotonic() > deadline:
            raise Timeout(f"{name}: {path} did not finish in the guest within {timeout:g}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def wait_guest_agent(qga: Path, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await guest_agent_call(qga, name, "guest-ping", timeout=2)
            return
        except VMAgentError as e:
            if time.monotonic() > deadline:
                raise Timeout(f"{name}: the guest agent did not answer within "
                              f"{timeout:g}s ({e.message})") from e
            await asyncio.sleep(0.1)
