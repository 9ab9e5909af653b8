"""Connecting to qemu's unix sockets never blocks the agent's event loop."""

from __future__ import annotations

import socket
import threading

import pytest

from vmagent.qemu.qmp import SocketBusy, connect_unix


def fill_queue(path) -> list[socket.socket]:
    """Connections that fill a never-accepting listener's queue, as earlier clients do."""
    queued = []
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(str(path))
        except BlockingIOError:
            c.close()
            return queued
        queued.append(c)
        assert len(queued) < 100


def test_a_full_listener_queue_is_an_error_at_once(tmp_path):
    """qemu takes one client at a time on a chardev socket (the guest agent's) and
    queues one more: a blocking connect to it waited in the kernel for as long as the
    first client stayed, and the agent with it (seen: the whole agent hung for minutes
    while a pool hand-over and the monitor's link check both talked to one guest)."""
    path = tmp_path / "qga.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(0)                       # never accepts: the queue fills
    queued = fill_queue(path)
    try:
        outcome: list = []

        def attempt() -> None:
            try:
                outcome.append(connect_unix(path))
            except Exception as e:         # noqa: BLE001 - the outcome is checked below
                outcome.append(e)
        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "connect_unix blocked on a full listener queue"
        assert isinstance(outcome[0], SocketBusy) and isinstance(outcome[0], OSError)
        assert "busy" in str(outcome[0])
    finally:
        for c in queued:
            c.close()
        server.close()


def test_a_listener_with_room_connects(tmp_path):
    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    try:
        sock = connect_unix(path)
        assert sock.getblocking() is False
        peer, _ = server.accept()
        sock.close()
        peer.close()
    finally:
        server.close()


def test_no_listener_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        connect_unix(tmp_path / "missing.sock")


def test_a_monitor_waits_its_turn_on_a_busy_socket(tmp_path):
    """A QMP or guest-agent connection (a pool's hand-over, a guest-exec) retries a busy
    socket, awake, until its timeout; then it says so."""
    import asyncio

    from vmagent.errors import Timeout
    from vmagent.qemu.qmp import Monitor

    path = tmp_path / "qga.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(0)
    queued = fill_queue(path)
    try:

        async def body():
            ticks = 0

            async def ticker():        # the event loop keeps running meanwhile
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)
            t = asyncio.create_task(ticker())
            with pytest.raises(Timeout, match="busy"):
                await Monitor(path, "vm1").connect(timeout=0.5)
            t.cancel()
            return ticks
        assert asyncio.run(body()) > 10
    finally:
        for c in queued:
            c.close()
        server.close()


def test_events_end_when_qemu_closes_the_connection(tmp_path):
    """The events sent before qemu went are read, then the iteration ends (qemu.qmp's
    own iterator waits on forever after a disconnect: the monitor saw a SIGKILLed qemu
    only at its next round, and a VM's last events were waited for 1 s)."""
    import asyncio
    import json

    from vmagent.qemu.qmp import Monitor
    path = tmp_path / "qmp.sock"

    async def qemu(reader, writer):
        writer.write(json.dumps({"QMP": {"version": {"qemu": {"major": 7, "minor": 2,
                     "micro": 0}, "package": ""}, "capabilities": []}}).encode() + b"\n")
        data = b""                       # qmp_capabilities (qemu.qmp ends it with no newline)
        while True:
            data += await reader.read(4096)
            try:
                ask = json.loads(data)
                break
            except ValueError:
                continue
        writer.write(json.dumps({"return": {}, **({"id": ask["id"]} if "id" in ask
                                                   else {})}).encode() + b"\n")
        await connected.wait()
        for kind in ("STOP", "SHUTDOWN"):
            writer.write(json.dumps({"event": kind, "data": {}, "timestamp": {
                "seconds": 0, "microseconds": 0}}).encode() + b"\n")
        await writer.drain()
        writer.close()                                       # qemu is gone

    connected = None

    async def body():
        nonlocal connected
        connected = asyncio.Event()
        server = await asyncio.start_unix_server(qemu, str(path))
        mon = await Monitor(path, "vm1").connect(5)
        connected.set()
        try:
            seen = [e["event"] async for e in mon.events()]
        finally:
            await mon.close()
            server.close()
        return seen
    seen = asyncio.run(asyncio.wait_for(body(), 10))
    assert seen == ["STOP", "SHUTDOWN"]
