"""The guest agent's channel (vmagent/qemu/guest.py: GuestAgent) against the QMP stub,
whose guest-agent socket serves one client at a time as qemu's does: one connection
kept for many calls, callers taking turns, a new connection after a call that did not
end cleanly or a qemu that died, the idle close, and guest-exec never sent twice."""

from __future__ import annotations

import asyncio

import pytest
from qemu.qmp import QMPClient

from stub_helpers import StubEnv, create, run, stub, until  # noqa: F401
from vmagent.errors import Timeout, VMAgentError
from vmagent.qemu import guest
from vmagent.qemu.guest import guest_exec

pytestmark = pytest.mark.timeout(60)


def qga_commands(vm) -> list[str]:
    return StubEnv.commands(vm.run_dir, "qga")


async def fresh_vm(agent, name: str = "vm1"):
    """A created VM whose guest-agent connection is closed: the test counts from 0."""
    await create(agent, name)
    vm = agent.registry.get(name)
    await vm.agent.close()
    return vm, vm.agent.connects, len(qga_commands(vm))


def test_one_connection_serves_many_calls(stub):
    async def body():
        async with stub.running() as agent:
            vm, connects, seen = await fresh_vm(agent)
            for _ in range(20):
                assert await vm.agent.ping(timeout=2)
            assert vm.agent.connects == connects + 1
            assert qga_commands(vm)[seen:] == ["guest-sync"] + ["guest-ping"] * 20
    run(body())


def test_callers_take_turns_within_their_timeout(stub):
    """A session holds the connection; a ping behind it waits its turn and gets it when
    the session ends, or gives up at its own timeout with "busy"."""
    async def body():
        async with stub.running() as agent:
            vm, connects, _ = await fresh_vm(agent)
            release = asyncio.Event()

            async def long_session():
                async with vm.agent.session(5) as mon:
                    await mon.execute("guest-ping")
                    await release.wait()
            holder = asyncio.ensure_future(long_session())
            await until(lambda: "guest-ping" in qga_commands(vm), 2, "the session's ping")
            with pytest.raises(Timeout, match="busy"):
                await vm.agent.call("guest-ping", timeout=0.3)
            waiting = asyncio.ensure_future(vm.agent.ping(timeout=3))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            release.set()
            assert await waiting and await holder is None
            assert vm.agent.connects == connects + 1       # the same connection
    run(body())


def test_an_unanswered_call_drops_the_connection(stub):
    """A ping that timed out may still be answered later: the connection is closed and
    the next call makes a new one, synchronised with a new id."""
    async def body():
        async with stub.running() as agent:
            vm, connects, _ = await fresh_vm(agent)
            assert await vm.agent.ping(timeout=2)
            StubEnv.vm_control(vm.run_dir, guest_agent="silent")
            assert not await vm.agent.ping(timeout=0.3)
            StubEnv.vm_control(vm.run_dir, guest_agent="on")
            assert await until(lambda: vm.agent.ping(timeout=0.5), 5, "an answer again")
            assert vm.agent.connects == connects + 2
            syncs = [e["arguments"]["id"] for e in StubEnv.log(vm.run_dir, "qga")
                     if e["execute"] == "guest-sync"]
            assert len(set(syncs[-2:])) == 2, syncs
    run(body())


def test_a_late_answer_is_not_taken_for_the_next_connections(stub):
    """qemu-ga answers a request that timed out to whoever is connected when it is
    ready: the next connection's first request must not be matched with it."""
    async def body():
        async with stub.running() as agent:
            vm, connects, _ = await fresh_vm(agent)
            StubEnv.vm_control(vm.run_dir, guest_agent_delay=1.0)
            assert not await vm.agent.ping(timeout=0.3)    # its guest-sync timed out
            StubEnv.vm_control(vm.run_dir, guest_agent_delay=0)
            assert await vm.agent.ping(timeout=3)          # the late answer dropped
            assert vm.agent.connects == connects + 1
    run(body())


def test_an_error_answer_keeps_the_connection(stub):
    async def body():
        async with stub.running() as agent:
            vm, connects, _ = await fresh_vm(agent)
            with pytest.raises(VMAgentError, match="CommandNotFound"):
                await vm.agent.call("guest-file-open", {"path": "/etc/hostname"})
            assert await vm.agent.ping(timeout=2)
            assert vm.agent.connects == connects + 1
    run(body())


def test_a_dead_qemu_fails_the_call_at_once(stub):
    async def body():
        async with stub.running() as agent:
            vm, _, _ = await fresh_vm(agent)
            assert await vm.agent.ping(timeout=2)
            StubEnv.vm_control(vm.run_dir, die=True)
            await until(lambda: not vm.machine.alive(), 5, "qemu gone")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert not await vm.agent.ping(timeout=5)
            assert loop.time() - t0 < 1            # connection lost, not a timeout
    run(body())


def test_an_idle_connection_is_closed_for_other_clients(stub, monkeypatch):
    """A VM nobody calls leaves the socket free: a client of its own (socat by hand)
    gets answers once the agent's idle connection is closed, and not before."""
    monkeypatch.setattr(guest, "IDLE_CLOSE", 0.5)

    async def body():
        async with stub.running() as agent:
            vm, _, _ = await fresh_vm(agent)
            assert await vm.agent.ping(timeout=2)
            other = QMPClient("by-hand")
            other.await_greeting = other.negotiate = False
            await other.connect(str(vm.qga))
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert await asyncio.wait_for(other.execute("guest-sync", {"id": 7}), 5) == 7
            assert loop.time() - t0 > 0.2          # it waited for the idle close
            await other.disconnect()
            assert await vm.agent.ping(timeout=2)  # and the agent connects again
    run(body())


def test_guest_exec_is_not_sent_twice(stub, monkeypatch):
    """guest-exec that got no answer may have started the program: the failure is
    final, not retried within agent_wait."""
    monkeypatch.setattr(guest, "CALL_TIMEOUT", 1.0)

    async def body():
        async with stub.running() as agent:
            vm, _, seen = await fresh_vm(agent)
            assert await vm.agent.ping(timeout=2)
            StubEnv.vm_control(vm.run_dir, guest_agent="silent")
            with pytest.raises(Timeout, match="guest-exec"):
                await guest_exec(vm.agent, "/bin/true", [], timeout=5, agent_wait=30)
            assert qga_commands(vm)[seen:].count("guest-exec") == 1
            StubEnv.vm_control(vm.run_dir, guest_agent="on")
            code, out = await guest_exec(vm.agent, "/bin/sh", ["-c", "accounts-synced"],
                                         timeout=5, agent_wait=5)
            assert (code, out) == (0, "accounts-synced\n")
    run(body())


def test_guest_exec_waits_for_an_agent_that_does_not_answer_yet(stub, monkeypatch):
    """Before guest-exec is sent (the agent's guest-sync unanswered) it is retried
    within agent_wait."""
    monkeypatch.setattr(guest, "CALL_TIMEOUT", 1.0)

    async def body():
        async with stub.running() as agent:
            vm, _, seen = await fresh_vm(agent)
            StubEnv.vm_control(vm.run_dir, guest_agent="silent")
            task = asyncio.ensure_future(
                guest_exec(vm.agent, "/usr/bin/perl", ["-e", "1"], timeout=5,
                           agent_wait=20))
            await until(lambda: qga_commands(vm)[seen:].count("guest-sync") >= 2, 5,
                        "a guest-sync retried")
            StubEnv.vm_control(vm.run_dir, guest_agent="on")
            code, out = await task
            assert code == 0 and "reidentified" in out
            assert qga_commands(vm)[seen:].count("guest-exec") == 1
    run(body(), timeout=40)
