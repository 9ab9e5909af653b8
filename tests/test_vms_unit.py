"""The agent's VM logic against the qemu stub (tests/qemu_stub.py): create, start, the
lifecycle, reconcile after a restart, the monitor, locks, state transitions and records,
streams and the warm create, each in well under a second, without a guest."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import socket
import time
from pathlib import Path

import pytest

from stub_helpers import (KEY, KEY2, StubEnv, call, create, events, make_template,
                          process_gone, read_state, run, stub, until)  # noqa: F401
from vmagent import rundir
from vmagent.errors import Conflict, InternalError, NotFound, QMPFailure, VMLaunchFailure
from vmagent.qemu.argv import owns_cmdline
from vmagent.qemu.machine import read_cmdline
from vmagent.vms.state import State

pytestmark = pytest.mark.timeout(60)

BOOTED = [("stopped", "starting"), ("starting", "running")]


def pid_of(run_dir: str | Path) -> int:
    return int((Path(run_dir) / rundir.PIDFILE).read_text())


# --- create and start -------------------------------------------------------------------

def test_create_runs_qemu_and_records_it(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            run_dir = Path(st["run_dir"])
            assert st["state"] == "running"
            await agent.monitor.round()         # the guest agent answers: link
            assert (await call(agent, "status", name="vm1"))["link_alive"]
            assert st["pid"] == pid_of(run_dir)
            assert owns_cmdline(read_cmdline(st["pid"]), run_dir)
            argv = json.loads((run_dir / rundir.ARGV).read_text())
            assert argv[0] == str(stub.qemu) and "-daemonize" in argv
            assert f"hostfwd=tcp:127.0.0.1:{st['ssh_port']}-:22" in " ".join(argv)
            state = read_state(run_dir)
            assert state["format"] == 1 and state["state"] == "running"
            assert state["creating"] is False
            assert events(run_dir) == BOOTED
            assert [v["name"] for v in (await call(agent, "list"))["vms"]] == ["vm1"]
            # the stub's boot reached cloud-init: the agent reads it from the console log
            await until(lambda: agent.registry.get("vm1").boot_progress()["cloud_init"]
                        == "done", what="cloud-init done in the console log")
    run(body())


def test_create_whose_qemu_fails_leaves_nothing(stub):
    stub.control(fail_start={"message": "-drive file=x: Could not open: Permission "
                                        "denied", "exitcode": 3})

    async def body():
        async with stub.running() as agent:
            with pytest.raises(VMLaunchFailure) as exc:
                await create(agent, "vm1")
            e = exc.value
            assert e.exitcode == 3 and e.command[0] == str(stub.qemu)
            assert "Permission denied" in e.output and "exit code 3" in e.message
            assert not (stub.state_dir / "vms" / "vm1").exists()
            assert (await call(agent, "list"))["vms"] == []
            with pytest.raises(NotFound):
                await call(agent, "status", name="vm1")
    run(body())
    assert stub.started_pids() == []


def test_host_forwarding_failure_is_retried_on_another_port(stub):
    stub.control(fail_start={"message": "-netdev user: Could not set up host forwarding "
                                        "rule 'tcp:127.0.0.1:{port}-:22'", "times": 1})

    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            failed = StubEnv.log(st["run_dir"], "start")
            assert len(failed) == 1
            assert st["state"] == "running" and st["ssh_port"] != failed[0]["ssh_port"]
            argv = json.loads((Path(st["run_dir"]) / rundir.ARGV).read_text())
            assert f"127.0.0.1:{st['ssh_port']}-:22" in " ".join(argv)
    run(body())


def test_port_taken_meanwhile_is_retried(stub):
    """The stub binds the forwarded port like slirp does: a port taken between the
    allocation and the start fails qemu, and the launcher picks another one."""
    async def body():
        async with stub.running() as agent:
            with socket.socket() as busy:
                busy.bind(("127.0.0.1", 0))
                busy.listen()
                taken = busy.getsockname()[1]
                real = agent.ports.allocate
                handed = iter([taken])
                agent.ports.allocate = lambda avoid=None: next(handed, None) or real(avoid)
                st = await create(agent, "vm1")
            assert st["state"] == "running" and st["ssh_port"] != taken
    run(body())


def test_start_of_a_stopped_vm(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1", start=False)
            assert st["state"] == "stopped" and st["pid"] is None
            assert stub.started_pids() == []
            st = await call(agent, "start", name="vm1")
            assert st["state"] == "running" and st["pid"] == pid_of(st["run_dir"])
            assert events(st["run_dir"]) == BOOTED
            with pytest.raises(Conflict):
                await call(agent, "start", name="vm1")
    run(body())


# --- lifecycle --------------------------------------------------------------------------

def test_shutdown_by_acpi_is_clean(stub):
    stub.control(guest_agent="absent")

    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            pid = st["pid"]
            st = await call(agent, "shutdown", name="vm1", timeout=5)
            assert st["state"] == "stopped" and st["reason"] is None and st["pid"] is None
            assert process_gone(pid)
            assert "system_powerdown" in stub.commands(st["run_dir"])
            assert "quit" not in stub.commands(st["run_dir"])
            assert events(st["run_dir"])[-2:] == [("running", "stopping"),
                                                  ("stopping", "stopped")]
    run(body())


def test_shutdown_ignored_by_the_guest_is_forced(stub):
    stub.control(guest_agent="absent", ignore_powerdown=True)

    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            st = await call(agent, "shutdown", name="vm1", timeout=0.3)
            assert st["state"] == "stopped" and "forced off" in st["reason"]
            assert process_gone(pid_of_last(stub))
            cmds = stub.commands(st["run_dir"])
            assert cmds.index("system_powerdown") < cmds.index("quit")
    run(body())


def pid_of_last(env: StubEnv) -> int:
    return env.started_pids()[-1]


def test_shutdown_through_the_guest_agent_is_clean(stub):
    """The guest powers off at once on guest-shutdown (which answers nothing): qemu
    exits within the agent's no-reply wait, and the lost connection is the order taken,
    not a missing agent (that would send system_powerdown to the exiting qemu and
    report it forced off)."""
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            st = await call(agent, "shutdown", name="vm1", timeout=5)
            assert "guest-shutdown" in stub.commands(st["run_dir"], "qga")
            assert st["state"] == "stopped" and st["reason"] is None
    run(body())


def test_poweroff_of_a_hung_qemu_kills_it(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            pid = st["pid"]
            stub.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            st = await call(agent, "poweroff", name="vm1")
            assert st["state"] == "stopped" and process_gone(pid)
            assert time.monotonic() - t0 < 3      # QMP quit timed out (0.5 s), SIGKILL
    run(body())


def test_poweroff_of_a_hung_qemu_without_a_monitor(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            await agent.registry.get("vm1").detach()   # as after a failed re-attach
            stub.kill(st["pid"], signal.SIGSTOP)
            st = await asyncio.wait_for(call(agent, "poweroff", name="vm1"), 3)
            assert st["state"] == "stopped"
    run(body())


def test_reboot_through_acpi(stub):
    stub.control(guest_agent="absent")

    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            pid = st["pid"]
            result = await call(agent, "reboot", name="vm1", timeout=5)
            assert result["method"] == "acpi" and result["state"] == "running"
            assert result["pid"] == pid
            cmds = stub.commands(st["run_dir"])
            i = cmds.index("system_powerdown")
            assert cmds[i - 1] == "set-action" and "system_reset" in cmds[i:]
            assert cmds[-1] == "set-action"         # the shutdown action restored
            assert "cont" in cmds[i:]               # the reset left it in prelaunch
            console = (Path(st["run_dir"]) / rundir.CONSOLE_LOG).read_text()
            assert console.count("Linux version") == 2
            status = await agent.registry.get("vm1").qmp("query-status")
            assert status["running"]
    run(body())


def test_hard_reset_and_delete(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            again = await call(agent, "hard_reset", name="vm1")
            assert again["state"] == "running" and again["pid"] != st["pid"]
            assert process_gone(st["pid"]) and not process_gone(again["pid"])
            assert events(st["run_dir"])[-2:] == [("running", "starting"),
                                                  ("starting", "running")]
            assert await call(agent, "delete", name="vm1") == {"deleted": "vm1"}
            assert process_gone(again["pid"]) and not Path(st["run_dir"]).exists()
            assert (await call(agent, "list"))["vms"] == []
    run(body())


def test_snapshot(stub):
    async def body():
        async with stub.running() as agent:
            await create(agent, "vm1")
            got = await call(agent, "snapshot", name="vm1", snapshot="s1")
            assert got["snapshot"]["name"] == "s1" and got["snapshot"]["vm_state_size"] > 0
            saves = [e for e in stub.log(got["run_dir"], "qmp")
                     if e["execute"] == "snapshot-save"]
            assert saves[0]["arguments"]["vmstate"] == "hd0"
            assert "job-dismiss" in stub.commands(got["run_dir"])
            listed = await call(agent, "snapshots", name="vm1")
            assert [s["name"] for s in listed["snapshots"]] == ["s1"]
            with pytest.raises(Conflict):
                await call(agent, "snapshot", name="vm1", snapshot="s1")
            StubEnv.vm_control(got["run_dir"], snapshot_error="No space left on device")
            with pytest.raises(QMPFailure, match="No space left"):
                await call(agent, "snapshot", name="vm1", snapshot="s2")
    run(body())


def test_push_config_swaps_the_seed_of_a_running_vm(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            assert st["config_pending"] is False
            st = await call(agent, "push_config", name="vm1", ssh_keys=[KEY, KEY2])
            assert st["config_pending"] is True
            swaps = [e["arguments"] for e in stub.log(st["run_dir"], "qmp")
                     if e["execute"] == "blockdev-change-medium"]
            assert swaps == [{"id": "cd0", "filename": str(Path(st["run_dir"]) / "seed.iso"),
                              "format": "raw", "read-only-mode": "read-only",
                              "force": True}]
            assert st["accounts_synced"]["ok"] is True    # guest-exec of /bin/sh
            assert read_state(st["run_dir"])["config_pending"] is True
    run(body())


# --- reconcile after an agent restart ---------------------------------------------------

def test_restart_readopts_a_running_vm(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
        async with stub.running() as again:
            vm = again.registry.get("vm1")
            assert vm.rec.rt.state == State.RUNNING and vm.machine.pid() == st["pid"]
            assert vm.monitor is not None          # QMP attached again
            assert (await vm.qmp("query-status"))["running"]
    run(body())


def test_restart_finds_a_killed_vm_broken(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
        stub.kill(st["pid"])
        await until(lambda: process_gone(st["pid"]), what="the stub's death")
        async with stub.running() as again:
            st = await call(again, "status", name="vm1")
            assert st["state"] == "broken" and "unexpectedly" in st["reason"]
    run(body())


@pytest.mark.parametrize("left", ["creating", "deleting"])
def test_restart_rolls_back_an_interrupted_create_or_delete(stub, left):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
        path = Path(st["run_dir"]) / rundir.STATE
        doc = json.loads(path.read_text())
        doc.update({"creating": True} if left == "creating" else {"state": "deleting"})
        path.write_text(json.dumps(doc))
        async with stub.running() as again:
            assert "vm1" not in again.registry
            assert not Path(st["run_dir"]).exists()
            await until(lambda: process_gone(st["pid"]), what="its qemu killed")
    run(body())


# --- the watcher ------------------------------------------------------------------------

@pytest.mark.parametrize("how,state,reason", [
    ("kill", "broken", "unexpectedly"),
    ("poweroff", "stopped", None),
    ("panic", "broken", "panicked"),
])
def test_watcher_sees_qemu_gone(stub, how, state, reason):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            await agent.monitor.round()
            assert agent.registry.get("vm1").rec.rt.state == State.RUNNING
            if how == "kill":
                stub.kill(st["pid"])
            else:
                StubEnv.vm_control(st["run_dir"], **{how: True})
            vm = agent.registry.get("vm1")
            await until(lambda: process_gone(st["pid"]), what=f"qemu gone after {how}")
            if how == "panic":      # its events have arrived (a late read: see below)
                await until(lambda: vm.last_event == "SHUTDOWN", what="the events")
            await agent.monitor.round()
            st = await call(agent, "status", name="vm1")
            assert st["state"] == state
            assert (st["reason"] is None) if reason is None else (reason in st["reason"])
            assert read_state(st["run_dir"])["state"] == state
    run(body())


def test_watcher_reports_a_panic_seen_late(stub):
    """The watcher's tick comes before the event task has read GUEST_PANICKED (the
    agent's loop was busy when qemu died): still a panic, not 'exited unexpectedly'."""
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            StubEnv.vm_control(st["run_dir"], panic=True)
            deadline = time.monotonic() + 5
            while not process_gone(st["pid"]) and time.monotonic() < deadline:
                time.sleep(0.01)          # the agent's loop is busy meanwhile
            await agent.monitor.round()
            st = await call(agent, "status", name="vm1")
            assert st["state"] == "broken" and "panicked" in st["reason"]
    run(body())


def test_watcher_checks_the_guest_sshd(stub):
    async def body():
        async with stub.running() as agent:
            await create(agent, "vm1")
            assert not (await call(agent, "status", name="vm1"))["net_alive"]
            await agent.monitor.round()
            assert (await call(agent, "status", name="vm1"))["net_alive"]
    run(body())


# --- locks, transitions, records --------------------------------------------------------

def test_busy_vm_lock_times_out(stub):
    async def body():
        async with stub.running(lock_wait=0.2) as agent:
            st = await create(agent, "vm1")
            held, release = asyncio.Event(), asyncio.Event()

            async def holder():
                async with agent.registry.locked("vm1"):
                    held.set()
                    await release.wait()
            task = asyncio.create_task(holder())
            await held.wait()
            with pytest.raises(Conflict, match="busy"):
                await call(agent, "shutdown", name="vm1")
            release.set()
            await task
            assert "system_powerdown" not in stub.commands(st["run_dir"])
            assert (await call(agent, "status", name="vm1"))["state"] == "running"
    run(body())


def test_transitions_are_guarded_and_recorded(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1", start=False)
            vm = agent.registry.get("vm1")
            state_file = Path(st["run_dir"]) / rundir.STATE
            before = state_file.read_bytes()
            with pytest.raises(InternalError, match="stopped -> stopping"):
                agent.registry.transition(vm, State.STOPPING)
            assert state_file.read_bytes() == before and vm.rec.rt.state == State.STOPPED
            assert events(st["run_dir"]) == []      # only the create operation's event
            agent.registry.transition(vm, State.STARTING, "by hand")
            doc = read_state(st["run_dir"])
            assert (doc["state"], doc["reason"]) == ("starting", "by hand")
            assert events(st["run_dir"]) == [("stopped", "starting")]
            with pytest.raises(InternalError, match="starting -> stopping"):
                agent.registry.transition(vm, State.STOPPING)
            assert read_state(st["run_dir"])["state"] == "starting"
    run(body())


def test_unknown_state_keys_of_a_newer_agent_are_kept(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1", start=False)
        path = Path(st["run_dir"]) / rundir.STATE
        doc = json.loads(path.read_text())
        path.write_text(json.dumps({**doc, "quota": {"cpu_seconds": 7}}))
        async with stub.running() as again:
            await call(again, "start", name="vm1")
            doc = read_state(st["run_dir"])
            assert doc["state"] == "running" and doc["quota"] == {"cpu_seconds": 7}
    run(body())


def test_a_newer_state_format_is_not_read_nor_overwritten(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
        path = Path(st["run_dir"]) / rundir.STATE
        newer = json.dumps({**json.loads(path.read_text()), "format": 2}).encode()
        path.write_bytes(newer)
        async with stub.running() as again:
            assert "vm1" not in again.registry
            with pytest.raises(NotFound):
                await call(again, "status", name="vm1")
        assert path.read_bytes() == newer
    run(body())


# --- streams ----------------------------------------------------------------------------

def test_console_and_tunnel_streams(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            con = await call(agent, "console", name="vm1")
            con.writer.write(b"echo-me\r")
            assert await asyncio.wait_for(con.reader.readexactly(8), 2) == b"echo-me\r"
            con.writer.close()
            ssh = await call(agent, "tunnel", name="vm1")
            banner = await asyncio.wait_for(ssh.reader.readline(), 2)
            assert banner.startswith(b"SSH-2.0-stub")
            ssh.writer.close()
            await call(agent, "poweroff", name="vm1")
            with pytest.raises(Conflict, match="running"):
                await call(agent, "console", name="vm1")
            assert "echo-me" in (Path(st["run_dir"]) / rundir.CONSOLE_LOG).read_text()
    run(body())


# --- warm create from a template --------------------------------------------------------

def test_warm_create_from_a_template(stub):
    async def body():
        async with stub.running() as agent:
            tpl = await make_template(agent)
            st = await create(agent, "clone1", template="tpl")
            assert st["state"] == "running" and st["template"] == "tpl"
            run_dir = Path(st["run_dir"])
            argv = json.loads((run_dir / rundir.ARGV).read_text())
            assert argv[-2:] == ["-incoming", "defer"]
            loaded = stub.log(run_dir, "migration")
            assert loaded and loaded[0]["incoming"] is True
            assert (loaded[0]["bytes"], loaded[0]["sha256"]) == (tpl.state_size,
                                                                 tpl.state_sha256)
            execs = [e["arguments"]["path"] for e in stub.log(run_dir, "qga")
                     if e["execute"] == "guest-exec"]
            assert execs == ["/usr/bin/perl"]
            assert (run_dir / rundir.CLONE_OF).read_text().strip() == "tpl"
            assert read_state(run_dir)["creating"] is False
    run(body())


def test_warm_create_whose_reidentification_fails_leaves_nothing(stub):
    stub.control(exec={"/usr/bin/perl": {"exitcode": 2, "out": "hostnamectl: no bus"}})

    async def body():
        async with stub.running() as agent:
            await make_template(agent)
            with pytest.raises(QMPFailure, match="re-identifying the clone failed"):
                await create(agent, "clone1", template="tpl")
            assert "clone1" not in agent.registry
            assert not (stub.state_dir / "vms" / "clone1").exists()
            await until(lambda: all(process_gone(p) for p in stub.started_pids()),
                        what="the clone's qemu gone")
    run(body())


# --- device models: a VM and a clone keep the CPU model they were made with -------------

def _cpu(run_dir) -> str:
    argv = json.loads((Path(run_dir) / rundir.ARGV).read_text())
    return argv[argv.index("-cpu") + 1]


def test_a_vm_keeps_its_device_model_across_restarts(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "vm1")
            assert read_state(st["run_dir"])["device_model"] == 2
            assert _cpu(st["run_dir"]) == "qemu64"
            await call(agent, "poweroff", name="vm1")
        # a record of an agent before device models (no key): it ran -cpu max
        path = Path(st["run_dir"]) / rundir.STATE
        state = json.loads(path.read_text())
        del state["device_model"]
        path.write_text(json.dumps(state))
        async with stub.running() as again:
            await call(again, "start", name="vm1")
            assert _cpu(st["run_dir"]) == "max"
    run(body())


@pytest.mark.parametrize("argv, cpu", [([], "max"), (["qemu", "-cpu", "max"], "max"),
                                        (["qemu", "-cpu", "qemu64"], "qemu64")])
def test_a_clone_runs_its_templates_device_model(stub, argv, cpu):
    async def body():
        async with stub.running() as agent:
            tpl = await make_template(agent)
            agent.templates.templates.save(dataclasses.replace(tpl, argv=argv),
                                           agent.templates.templates.dir(tpl.name))
            st = await create(agent, "clone1", template="tpl")
            assert _cpu(st["run_dir"]) == cpu
    run(body())
