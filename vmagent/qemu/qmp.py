"""QMP and guest-agent access, only through ``qemu.qmp``, with a timeout on every call.

Unix socket paths are limited to 107 bytes; a run dir can be deeper than that (a long
state dir, a 63-character VM name). :func:`connect_unix` connects through the run dir's
``/proc/self/fd/N`` alias when the plain path is too long.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from vmagent.errors import QMPFailure, Timeout

log = logging.getLogger(__name__)

SUN_PATH_MAX = 107
DEFAULT_TIMEOUT = 10.0
BUSY_RETRY = 0.05           # how often a busy socket is tried again


class SocketBusy(ConnectionError):
    """A unix socket whose listener does not take another connection now."""


def connect_unix(path: Path) -> socket.socket:
    """A connected, non-blocking AF_UNIX stream socket to ``path`` (any length).

    The connect itself never blocks: a listener whose queue is full (qemu accepts one
    client at a time on a chardev socket, such as the guest agent's, and queues one more)
    makes a blocking ``connect`` wait in the kernel for as long as that client stays,
    with the agent's whole event loop behind it. Here that is an error at once
    (:class:`SocketBusy`), which callers treat as any other failed connection."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        target = str(path)
        if len(os.fsencode(target)) <= SUN_PATH_MAX:
            sock.connect(target)
        else:
            dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
            try:
                sock.connect(f"/proc/self/fd/{dirfd}/{path.name}")
            finally:
                os.close(dirfd)
        return sock
    except BlockingIOError:
        sock.close()
        raise SocketBusy(f"{path.name}: busy (its listener's queue is full)") from None
    except BaseException:
        sock.close()
        raise


class _Client(QMPClient):
    """qemu.qmp's client, whose message hooks format each message for the debug log
    only when that log is on (qemu.qmp's own format every message, pretty-printed JSON:
    the monitor sends and reads several per VM each second)."""

    def _cb_outbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


class Monitor:
    """One QMP (or guest agent) connection. ``execute`` never waits forever."""

    def __init__(self, path: Path, name: str, *, guest_agent: bool = False,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.name = name
        self.timeout = timeout
        self.client = _Client(name)
        if guest_agent:
            # qemu-ga sends no greeting and knows no qmp_capabilities
            self.client.await_greeting = False
            self.client.negotiate = False

    async def connect(self, timeout: float | None = None) -> "Monitor":
        limit = timeout or self.timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                sock = connect_unix(self.path)
                break
            except SocketBusy as e:         # another client now: wait our turn, awake
                if time.monotonic() >= deadline:
                    raise Timeout(f"{self.name}: {self.path.name} stayed busy with "
                                  f"other clients for {limit:g}s") from e
                await asyncio.sleep(BUSY_RETRY)
            except OSError as e:
                raise QMPFailure(f"{self.name}: cannot connect to {self.path.name}: "
                                 f"{e.strerror or e}", socket=str(self.path)) from e
        try:
            await asyncio.wait_for(self.client.connect(sock), timeout or self.timeout)
        except asyncio.TimeoutError as e:
            sock.close()
            raise Timeout(f"{self.name}: no QMP greeting within "
                          f"{timeout or self.timeout:g}s") from e
        except QMPError as e:
            sock.close()
            raise QMPFailure(f"{self.name}: QMP handshake failed: {e}") from e
        return self

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        limit = timeout or self.timeout
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), limit)
        except asyncio.TimeoutError as e:
            raise Timeout(f"{self.name}: {command} did not answer within {limit:g}s",
                          command=command) from e
        except ExecuteError as e:
            raise QMPFailure(f"{self.name}: {command} failed: {e.error_class}: {e}", command=command, arguments=arguments,
                             error_class=e.error_class) from e
        except (QMPError, OSError, EOFError) as e:
            raise QMPFailure(f"{self.name}: {command}: connection lost ({e})",
                             command=command) from e

    async def issue(self, command: str, arguments: dict[str, Any] | None = None,
                    timeout: float | None = None) -> asyncio.Task:
        """Send ``command`` and return once it is written to the socket; its answer is
        the returned task's (for a command that answers late while what it did is done
        at once: ``guest-set-time`` sets the clock, then waits for ``hwclock -w``).
        (qemu.qmp has no public "sent": its pending-reply table and outgoing queue tell.)"""
        before = set(self.client._pending)
        task = asyncio.ensure_future(self.execute(command, arguments, timeout))
        while not task.done() and set(self.client._pending) <= before:
            await asyncio.sleep(0)
        if not task.done():
            await self.client._outgoing.join()
        return task

    @property
    def connected(self) -> bool:
        return self.client.runstate == Runstate.RUNNING

    async def wait_closed(self) -> None:
        """Until the connection is down (qemu closed it: exited or died; or we did)."""
        while self.client.runstate == Runstate.RUNNING:
            await self.client.runstate_changed()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """qemu's events as they come; the iteration ends once the connection is down
        and what qemu sent before is read. (qemu.qmp's own event iterator waits on
        forever after a disconnect.)"""
        listener = self.client.events
        closed = asyncio.ensure_future(self.wait_closed())
        try:
            while not (closed.done() and listener.empty()):
                get = asyncio.ensure_future(listener.get())
                await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield get.result()
                else:
                    get.cancel()
        finally:
            closed.cancel()

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.disconnect(), 5)
        except Exception as e:  # noqa: BLE001 - closing a dead connection is fine
            log.debug("%s: disconnect: %s", self.name, e)

    async def __aenter__(self) -> "Monitor":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
