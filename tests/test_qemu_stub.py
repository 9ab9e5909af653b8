"""The qemu stub itself, driven with the argv the agent builds and spoken to with the real
``qemu.qmp`` client, so that the unit tests of the agent (test_vms_unit.py) can trust
what it answers: qemu's daemonizing, QMP's protocol and errors, events, the guest agent,
the console, the forwarded port and the behaviour switches."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from stub_helpers import StubEnv, process_gone, run, stub, until  # noqa: F401
from vmagent import rundir
from vmagent.qemu.argv import MachineConfig, build_argv, owns_cmdline
from vmagent.qemu.machine import read_cmdline

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(env: StubEnv, name: str = "s1", *extra: str) -> tuple[Path, int, list[str]]:
    """Start the stub as the agent would: its argv, from its run dir; (run dir, pid,
    argv). The stub must have daemonized by the time it returns."""
    run_dir = env.base / name
    run_dir.mkdir(exist_ok=True)
    argv = build_argv(MachineConfig(
        name=name, run_dir=run_dir, cpus=1, memory=256 << 20, accel="tcg",
        ssh_port=free_port(), mac="52:54:00:00:00:01", vmgenid=str(uuid.uuid4()),
        qemu_binary=str(env.qemu))) + list(extra)
    proc = subprocess.run(argv, cwd=run_dir, capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    return run_dir, int((run_dir / rundir.PIDFILE).read_text()), argv


async def qmp(run_dir: Path) -> QMPClient:
    client = QMPClient("test")
    await asyncio.wait_for(client.connect(str(run_dir / rundir.QMP_SOCK)), 5)
    return client


async def gone(client: QMPClient) -> None:
    """Disconnect from a qemu that exited: qemu.qmp reports the EOF it saw."""
    with contextlib.suppress(EOFError):
        await client.disconnect()


def test_daemonizes_like_qemu(stub):
    run_dir, pid, argv = launch(stub)
    # the parent is gone and its output pipe closed; the daemon runs, with everything
    # in place, in a session of its own, and shows as this run dir's qemu
    for name in (rundir.QMP_SOCK, rundir.QGA_SOCK, rundir.CONSOLE_SOCK, rundir.VNC_SOCK):
        assert (run_dir / name).is_socket(), name
    assert not process_gone(pid) and os.getsid(pid) == pid
    assert owns_cmdline(read_cmdline(pid), run_dir)
    assert stub.started_pids() == [pid]
    assert "Linux version" in (run_dir / rundir.CONSOLE_LOG).read_text()
    assert subprocess.run([str(stub.qemu), "--version"], capture_output=True,
                          text=True).stdout.startswith("QEMU emulator version 7.2.0")


def test_qmp_protocol(stub):
    run_dir, pid, _ = launch(stub)

    async def body():
        # before qmp_capabilities, every command is refused (a raw connection)
        reader, writer = await asyncio.open_unix_connection(str(run_dir / rundir.QMP_SOCK))
        greeting = json.loads(await reader.readline())
        assert greeting["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
        writer.write(b'{"execute": "query-status", "id": 7}')
        answer = json.loads(await reader.readline())
        assert answer["error"]["class"] == "CommandNotFound" and answer["id"] == 7
        writer.close()

        client = await qmp(run_dir)
        assert await client.execute("query-status") == {
            "status": "running", "running": True, "singlestep": False}
        with pytest.raises(ExecuteError) as exc:
            await client.execute("no-such-command")
        assert exc.value.error_class == "CommandNotFound"
        with pytest.raises(ExecuteError, match="incoming"):
            await client.execute("migrate-incoming", {"uri": "exec:cat /dev/null"})
        await client.execute("stop")
        assert (await client.execute("query-status"))["status"] == "paused"
        await client.execute("cont")
        assert await client.execute("quit") == {}
        await until(lambda: process_gone(pid), what="exit after quit")
        await gone(client)
        assert not (run_dir / rundir.PIDFILE).exists()
    run(body())


def test_powerdown_events_and_exit(stub):
    run_dir, pid, _ = launch(stub)

    async def body():
        client = await qmp(run_dir)
        seen = []

        async def listen():
            async for event in client.events:
                seen.append(event["event"])
        task = asyncio.create_task(listen())
        await client.execute("system_reset")
        await until(lambda: "RESET" in seen, what="RESET")
        assert (run_dir / rundir.CONSOLE_LOG).read_text().count("Linux version") == 2
        await client.execute("system_powerdown")
        await until(lambda: process_gone(pid), what="exit after powerdown")
        await until(lambda: "SHUTDOWN" in seen, what="SHUTDOWN")
        assert seen.index("POWERDOWN") < seen.index("SHUTDOWN")
        assert "reboot: Power down" in (run_dir / rundir.CONSOLE_LOG).read_text()
        task.cancel()
        await gone(client)
    run(body())


def test_switches(stub):
    # no delay: a powerdown not ignored would exit before the next command is read
    stub.control(ignore_powerdown=True, guest_agent="absent", shutdown_delay=0)
    run_dir, pid, _ = launch(stub)

    async def body():
        assert not (run_dir / rundir.QGA_SOCK).exists()
        client = await qmp(run_dir)
        await client.execute("system_powerdown")
        assert (await client.execute("query-status"))["running"]
        assert not process_gone(pid)
        StubEnv.vm_control(run_dir, panic=True)
        await until(lambda: process_gone(pid), what="exit after a panic")
        kinds = [e["event"] for e in stub.log(run_dir, "event")]
        assert kinds[-2:] == ["GUEST_PANICKED", "SHUTDOWN"]
        await gone(client)
    run(body())


def test_fail_start_only_as_often_as_told(stub):
    stub.control(fail_start={"message": "Could not set up host forwarding rule "
                                        "'tcp:127.0.0.1:{port}-:22'", "exitcode": 1,
                             "times": 1})
    run_dir = stub.base / "f1"
    run_dir.mkdir()
    with pytest.raises(AssertionError, match=r"host forwarding rule 'tcp:127\.0\.0\.1:\d+"):
        launch(stub, "f1")
    assert stub.started_pids() == []
    _, pid, _ = launch(stub, "f1")
    assert not process_gone(pid)


def test_guest_agent_console_and_ssh(stub):
    run_dir, pid, argv = launch(stub)
    port = int(next(a for a in argv if "hostfwd" in a).rsplit(":", 2)[1].split("-")[0])

    async def body():
        ga = QMPClient("qga")
        ga.await_greeting = ga.negotiate = False
        await ga.connect(str(run_dir / rundir.QGA_SOCK))
        assert await ga.execute("guest-sync", {"id": 4242}) == 4242
        started = await ga.execute("guest-exec", {"path": "/usr/bin/perl", "arg": ["-e"],
                                                  "capture-output": True})
        st = await ga.execute("guest-exec-status", {"pid": started["pid"]})
        assert st["exited"] and st["exitcode"] == 0
        assert b"reidentified" in base64.b64decode(st["out-data"])
        await ga.disconnect()

        reader, writer = await asyncio.open_unix_connection(
            str(run_dir / rundir.CONSOLE_SOCK))
        writer.write(b"root\n")
        assert await asyncio.wait_for(reader.readexactly(5), 2) == b"root\n"
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(reader.readline(), 2)).startswith(b"SSH-2.0-stub")
        writer.close()
        await until(lambda: "Cloud-init v. 22.4 finished at" in
                    (run_dir / rundir.CONSOLE_LOG).read_text(), what="cloud-init line")
    run(body())


def test_silent_guest_agent_never_answers(stub):
    stub.control(guest_agent="silent")
    run_dir, _, _ = launch(stub)

    async def body():
        ga = QMPClient("qga")
        ga.await_greeting = ga.negotiate = False
        await ga.connect(str(run_dir / rundir.QGA_SOCK))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ga.execute("guest-ping"), 0.3)
        assert stub.commands(run_dir, "qga") == ["guest-ping"]
        await ga.disconnect()
    run(body())


def test_hang_and_die(stub):
    run_dir, pid, _ = launch(stub)

    async def body():
        client = await qmp(run_dir)
        StubEnv.vm_control(run_dir, hang=True)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.execute("query-status"), 0.3)
        assert stub.commands(run_dir)[-1] == "query-status"     # read, not answered
        StubEnv.vm_control(run_dir, die=True)
        await until(lambda: process_gone(pid), what="exit on die")
        assert stub.log(run_dir, "event") == []                  # no SHUTDOWN: a crash
        assert (run_dir / rundir.PIDFILE).exists()               # nothing cleaned up
        await gone(client)
    run(body())
