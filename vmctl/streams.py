"""Byte streams over the agent's websockets: the console (raw tty) and the SSH tunnel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from typing import Any

DETACH = b"\x1d"          # Ctrl-]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


async def _ws_to_fd(ws: Any, fd: int) -> None:
    import aiohttp    # late: importing aiohttp costs more than the rest of vmctl
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            _write_all(fd, msg.data)
        elif msg.type == aiohttp.WSMsgType.TEXT:
            _write_all(fd, msg.data.encode())
        elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
            break


async def _stdin_chunks(fd: int):
    """Yield what arrives on ``fd`` (a tty, pipe or socket) until EOF."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        queue.put_nowait(data)
        if not data:
            loop.remove_reader(fd)

    try:
        loop.add_reader(fd, readable)
    except (PermissionError, ValueError):      # a regular file: read it in one go
        data = await asyncio.to_thread(os.read, fd, 1 << 20)
        while data:
            yield data
            data = await asyncio.to_thread(os.read, fd, 1 << 20)
        return
    try:
        while True:
            data = await queue.get()
            if not data:
                return
            yield data
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)


async def bridge(client: Any, op: str, name: str, *, in_fd: int, out_fd: int,
                 detach_key: bytes | None = None, linger: float = 0.0) -> str:
    """Copy ``in_fd`` -> websocket and websocket -> ``out_fd`` until either side ends.
    Returns why it ended: "detached", "eof" or "closed"."""
    session, ws = await client.websocket(op, name=name)
    reason = "closed"
    try:
        down = asyncio.ensure_future(_ws_to_fd(ws, out_fd))

        async def up() -> str:
            async for data in _stdin_chunks(in_fd):
                if detach_key and detach_key in data:
                    before = data.split(detach_key, 1)[0]
                    if before:
                        await ws.send_bytes(before)
                    return "detached"
                await ws.send_bytes(data)
            return "eof"

        up_task = asyncio.ensure_future(up())
        done, _ = await asyncio.wait({down, up_task}, return_when=asyncio.FIRST_COMPLETED)
        if up_task in done:
            reason = up_task.result()
            if reason == "eof" and linger:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(down), linger)
        for task in (down, up_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    finally:
        await ws.close()
        await session.close()
    return reason


@contextlib.contextmanager
def raw_terminal(fd: int):
    """Put the terminal ``fd`` in raw mode (if it is one) and restore it afterwards."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def real_fd(stream: Any, default: int) -> int | None:
    """The OS file descriptor behind ``stream`` (None under click's CliRunner)."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None if stream is not getattr(sys, "__stdin__", None) else default
