"""A VM's qemu-guest-agent channel (:class:`GuestAgent`) and running programs in the
guest through it (``guest-exec``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

from vmagent.errors import QMPFailure, Timeout, VMAgentError
from vmagent.poll import poll_until
from vmagent.qemu.qmp import Monitor

log = logging.getLogger(__name__)

IDLE_CLOSE = 10.0           # an unused connection is closed after this many seconds
CALL_TIMEOUT = 10.0         # guest_exec: for each of its calls (qemu-ga answers in ms)


class GuestAgent:
    """One VM's guest-agent channel: one connection, kept open and taken in turns.

    qemu's chardev socket serves one client at a time (the next one waits in its
    queue), so every caller in the agent goes through this one object: the monitor's
    ping each second, a hand-over's file writes, ``guest-exec`` of a program. A
    :meth:`session` holds the connection for a few commands in a row; a call waits its
    turn within its own timeout. Keeping the connection saves a connect, a
    ``guest-sync`` and qemu.qmp's reader and writer tasks per call (a ping on a fresh
    connection costs 0.7 ms of CPU, on a kept one 0.17 ms: docs/performance.md).

    A new connection numbers its requests from a random start and begins with a
    ``guest-sync`` (a random token, which qemu-ga echoes): qemu-ga answers every
    request it ever got, in order, to whoever is connected then, and a reply meant for
    an earlier client must not be read as this one's. After a
    call that did not end cleanly (a timeout, a lost connection, a cancelled task: its
    answer may still come) the connection is dropped and the next call makes a new one.
    A connection unused for :data:`IDLE_CLOSE` seconds is closed, so that a VM nobody
    watches leaves the socket free for others (``socat`` by hand); a watched one stays
    connected. The connection of a qemu that exited is found down and replaced."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)
        self.name = name
        self._lock = asyncio.Lock()
        self._mon: Monitor | None = None
        self._closing: asyncio.Task | None = None
        self._used = 0.0
        self._idle: asyncio.TimerHandle | None = None
        self.connects = 0           # connections made (the tests count them)

    @contextlib.asynccontextmanager
    async def session(self, timeout: float = 5.0) -> AsyncIterator[Monitor]:
        """The connection, for this caller alone, until the block ends; connecting
        and waiting for another caller's turn count against ``timeout``."""
        deadline = time.monotonic() + timeout
        if self._lock.locked():
            try:
                async with asyncio.timeout(timeout):
                    await self._lock.acquire()
            except TimeoutError:
                raise Timeout(f"{self.name}: the guest agent stayed busy with another "
                              f"call for {timeout:g}s") from None
        else:
            await self._lock.acquire()
        try:
            mon = await self._connected(max(0.05, deadline - time.monotonic()))
        except BaseException:
            self._drop()
            self._lock.release()
            raise
        clean = False
        try:
            yield mon
            clean = True
        except QMPFailure as e:
            # qemu-ga answered with an error: the connection is in step still
            clean = e.details.get("error_class") is not None
            raise
        finally:
            if clean:
                self._used = time.monotonic()
                self._arm_idle()
            else:
                self._drop()
            self._lock.release()

    async def call(self, command: str, arguments: dict[str, Any] | None = None, *,
                   timeout: float = 5.0, no_reply: bool = False) -> Any:
        """One command. ``no_reply``: it answers nothing on success (guest-shutdown):
        no answer within ``timeout`` or the connection going down is success."""
        async with self.session(timeout) as mon:
            if not no_reply:
                return await mon.execute(command, arguments, timeout)
            try:
                await mon.execute(command, arguments, timeout)
            except Timeout:
                pass
            except QMPFailure as e:
                if "connection lost" not in e.message:
                    raise
                # the guest went down on the order (its agent with it): taken
            return None

    async def ping(self, timeout: float = 2.0) -> bool:
        """Whether the guest agent answers a ``guest-ping`` within ``timeout`` (a guest
        agent that stays busy with another caller past it counts as not answering)."""
        try:
            await self.call("guest-ping", timeout=timeout)
            return True
        except VMAgentError:
            return False

    async def close(self) -> None:
        """Close the connection (the VM's qemu is detached, stopped or gone)."""
        self._drop()
        if self._closing is not None:
            await asyncio.shield(self._closing)

    # --- the connection ---------------------------------------------------------------

    async def _connected(self, timeout: float) -> Monitor:
        mon = self._mon
        if mon is not None and mon.connected:
            return mon
        self._drop()
        if self._closing is not None:     # our last connection goes first, or the new
            await asyncio.shield(self._closing)   # one waits behind it in the queue
        mon = Monitor(self.path, f"{self.name}/qga", guest_agent=True, timeout=timeout)
        # qemu-ga echoes each request's id; qemu.qmp numbers them from 0 per client, so
        # a late answer to the last connection's call could match this one's: start at
        # a random number, and qemu.qmp drops what it cannot route
        mon.client._execute_id = int.from_bytes(os.urandom(4), "big")
        await mon.connect()
        self._mon = mon                   # dropped by the caller if what follows fails
        token = int.from_bytes(os.urandom(4), "big") >> 1
        got = await mon.execute("guest-sync", {"id": token}, timeout)
        if got != token:
            raise QMPFailure(f"{self.name}: guest agent out of sync")
        self.connects += 1
        return mon

    def _drop(self) -> None:
        mon, self._mon = self._mon, None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if mon is not None:
            previous = self._closing

            async def close() -> None:
                if previous is not None:
                    await previous
                await mon.close()
            self._closing = asyncio.ensure_future(close())

    def _arm_idle(self) -> None:
        if self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(IDLE_CLOSE, self._idle_check)

    def _idle_check(self) -> None:
        self._idle = None
        if self._mon is None:
            return
        unused = time.monotonic() - self._used
        if self._lock.locked() or unused < IDLE_CLOSE:
            self._idle = asyncio.get_running_loop().call_later(
                max(0.1, IDLE_CLOSE - unused), self._idle_check)
        else:
            self._drop()


async def guest_exec(agent: GuestAgent, path: str, args: list[str],
                     timeout: float = 60.0, agent_wait: float = 0.0) -> tuple[int, str]:
    """Run a program in the guest through the guest agent; (exit code, output).
    ``agent_wait``: how long to retry while the guest agent does not answer yet. The
    start is never sent twice: once ``guest-exec`` is written, a failure is final (the
    program may run). Between the status polls other callers get their turn."""
    agent_deadline = time.monotonic() + agent_wait
    last: list[VMAgentError] = []
    cmd = {"path": path, "arg": args, "capture-output": True}

    async def attempt() -> dict | None:
        try:
            return await agent.call("guest-exec", cmd, timeout=CALL_TIMEOUT)
        except VMAgentError as e:
            if e.details.get("command") == "guest-exec" and \
                    e.details.get("error_class") is None:
                raise                    # sent and not answered: it may run
            last[:] = [e]
            return None

    started = await poll_until(attempt, max(0.0, agent_deadline - time.monotonic()),
                               interval=0.05)
    if started is None:
        raise Timeout(f"{agent.name}: the guest agent did not run {path} "
                      f"({last[0].message if last else 'no answer'})")
    pid = started["pid"]

    async def exited() -> dict | None:
        st = await agent.call("guest-exec-status", {"pid": pid}, timeout=CALL_TIMEOUT)
        return st if st.get("exited") else None

    st = await poll_until(exited, timeout, interval=0.02, max_interval=0.1,
                          error=f"{agent.name}: {path} did not finish in the guest "
                                f"within {timeout:g}s")
    assert st is not None
    out = base64.b64decode(st.get("out-data", "") or "") + \
        base64.b64decode(st.get("err-data", "") or "")
    return st.get("exitcode", -1), out.decode("utf-8", "replace")


async def wait_guest_agent(agent: GuestAgent, timeout: float) -> None:
    await poll_until(agent.ping, timeout, interval=0.1,
                     error=f"{agent.name}: the guest agent did not answer within "
                           f"{timeout:g}s")
