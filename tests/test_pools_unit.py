"""Warm pools (vmagent/pools/) against the QMP stub: definitions, capacity, the fill
(members warm-started, paused, marked), the take (renamed, resumed, re-identified, the
caller's), the refill, re-adoption after a restart, removal."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from stub_helpers import (KEY, StubEnv, call, make_template, run, stub,  # noqa: F401
                          until)
from vmagent import rundir
from vmagent.errors import BadRequest, Conflict, NotFound
from vmagent.pools import warmup
from vmagent.pools.store import PoolStore, read_mark


@pytest.fixture(autouse=True)
def _no_sshd_in_the_stub(monkeypatch):
    # the stub greets but speaks no SSH: the warm-up login gives up at once
    monkeypatch.setattr(warmup, "LOGIN_TIMEOUT", 0.5)


async def template(agent) -> None:
    """The stub's template, and a key for the caller (the pool's members are theirs)."""
    await make_template(agent)
    await call(agent, "key_add", keys=KEY)


async def pool_of_one(agent, pool: str) -> str:
    """A template and a pool of 1 on it, filled: its member's name."""
    await template(agent)
    await call(agent, "pool_create", pool=pool, template="tpl", size=1)
    (member,) = await filled(agent, pool, 1)
    return member


def ready(agent, pool: str) -> list[str]:
    return [vm.name for vm in agent.pools.members(pool, ready=True)]


async def filled(agent, pool: str, n: int) -> list[str]:
    await until(lambda: len(ready(agent, pool)) == n and not agent.pools.filling,
                timeout=30, what=f"pool {pool} filled with {n}")
    return ready(agent, pool)


def test_pool_definitions_are_checked(stub):
    async def body():
        async with stub.running() as agent:
            await template(agent)
            for params, err in (({"pool": "Bad!", "template": "tpl", "size": 1}, BadRequest),
                                ({"pool": "p", "template": "tpl", "size": 0}, BadRequest),
                                ({"pool": "p", "template": "tpl", "size": "x"}, BadRequest),
                                ({"pool": "p", "template": "nope", "size": 1}, NotFound),
                                ({"pool": "p", "size": 1}, BadRequest)):
                with pytest.raises(err):
                    await call(agent, "pool_create", **params)
            assert (await call(agent, "pool_list")) == {"pools": []}
            with pytest.raises(NotFound):
                await call(agent, "pool_show", pool="p")
    run(body())


def test_a_pool_that_does_not_fit_is_refused_with_the_numbers(stub):
    async def body():
        async with stub.running() as agent:
            await template(agent)
            with pytest.raises(Conflict) as e:
                await call(agent, "pool_create", pool="big", template="tpl", size=64)
            assert e.value.details["refused"] == "capacity"
            assert not (agent.settings.state_dir / "pools" / "big.json").exists()
            before = agent.alloc.ledger.free()
            await call(agent, "pool_create", pool="p2", template="tpl", size=2)
            # the pool's places are held at once, member or not
            assert agent.alloc.ledger.free().ram < before.ram
            held = before.ram - agent.alloc.ledger.free().ram
            await filled(agent, "p2", 2)
            assert before.ram - agent.alloc.ledger.free().ram == held
    run(body(), timeout=60)


def test_pool_fills_takes_and_refills(stub):
    async def body():
        async with stub.running() as agent:
            await template(agent)
            doc = await call(agent, "pool_create", pool="ci", template="tpl", size=2)
            assert doc["size"] == 2 and doc["template"] == "tpl"
            record = json.loads((agent.settings.state_dir / "pools" / "ci.json").read_text())
            assert record["format"] == 1 and record["size"] == 2
            members = await filled(agent, "ci", 2)
            for name in members:
                vm = agent.registry.get(name)
                assert vm.rec.spec.ephemeral and vm.rec.spec.ssh_keys == []
                assert StubEnv.commands(vm.run_dir)[-1] == "stop"      # paused
                assert read_mark(vm.run_dir)["ready"] is True
            with pytest.raises(BadRequest, match="memory: a VM taken from pool"):
                await call(agent, "create", name="j1", pool="ci", memory="1G",
                           ssh_keys=[KEY])
            with pytest.raises(BadRequest, match="give one"):
                await call(agent, "create", name="j1", pool="ci", template="tpl",
                           ssh_keys=[KEY])
            st = await call(agent, "create", name="j1", pool="ci", ssh_keys=[KEY],
                            ephemeral=True, ttl=600)
            member = st["handover"]["member"]
            assert member in members and st["name"] == "j1" and st["pool"] == "ci"
            assert st["state"] == "running" and st["ephemeral"] and st["expires_at"]
            vm = agent.registry.get("j1")
            assert vm.run_dir.name == "j1" and not (vm.run_dir.parent / member).exists()
            assert member not in agent.registry
            assert vm.machine.alive()                     # the same qemu, renamed
            assert read_mark(vm.run_dir) is None
            cmds = StubEnv.commands(vm.run_dir)
            assert cmds[cmds.index("stop"):][:2] == ["stop", "cont"]
            execs = [e["arguments"]["arg"] for e in StubEnv.log(vm.run_dir, "qga")
                     if e["execute"] == "guest-exec"]
            assert "j1" in execs[-1]                      # the final hostname
            assert KEY.split()[1].encode().hex() in "".join(execs[-1])    # its keys
            # the pool makes a new member
            again = await filled(agent, "ci", 2)
            assert member not in again and len(set(again) - set(members)) == 1
            assert (await call(agent, "pool_show", pool="ci"))["ready"] == 2
    run(body(), timeout=90)


def test_an_empty_pool_says_so(stub):
    async def body():
        async with stub.running() as agent:
            await template(agent)
            StubEnv.control(stub, migrate_error="no state for you")
            await call(agent, "pool_create", pool="e", template="tpl", size=1)
            await until(lambda: agent.pools.errors.get("e"), timeout=30,
                        what="the fill error")
            with pytest.raises(Conflict, match="no ready VM"):
                await call(agent, "create", name="j2", pool="e", ssh_keys=[KEY])
            assert "j2" not in agent.registry
            doc = (await call(agent, "pool_list"))["pools"][0]
            assert doc["ready"] == 0 and doc["error"]
    run(body(), timeout=60)


def test_pools_and_taken_vms_survive_a_restart_and_remove(stub):
    async def body():
        async with stub.running() as agent:
            await pool_of_one(agent, "r")
            await call(agent, "create", name="took", pool="r", ssh_keys=[KEY])
            await filled(agent, "r", 1)
            left = ready(agent, "r")
        async with stub.running() as again:
            assert list(again.pools.pools) == ["r"]
            assert ready(again, "r") == left           # re-found, not made again
            took = again.registry.get("took")
            assert took.rec.rt.state.value == "running" and took.machine.alive()
            doc = await call(again, "pool_remove", pool="r")
            assert doc["deleted"] == left
            assert left[0] not in again.registry and "took" in again.registry
            assert PoolStore(again.settings.state_dir / "pools").load_all() == {}
            assert again.alloc.ledger.in_flight == {}
    run(body(), timeout=90)


def test_a_member_that_was_not_ready_is_made_again_after_a_restart(stub):
    async def body():
        async with stub.running() as agent:
            old = await pool_of_one(agent, "n")
            mark = agent.registry.get(old).run_dir / rundir.POOL_MEMBER
        mark.write_text(json.dumps({"pool": "n", "ready": False}))
        async with stub.running() as again:
            assert old not in again.registry
            (new,) = await filled(again, "n", 1)
            assert new != old
    run(body(), timeout=90)


def test_the_take_does_not_wait_for_the_guests_rtc_sync(stub):
    """qemu-ga sets the clock as it takes guest-set-time, then runs `hwclock -w`
    (which waits for the RTC's next second) before it answers: the take returns once
    the command is written, the last of the hand-over's commands; the connection waits
    for the answer, so the next client of the guest agent gets its own."""
    import time

    async def body():
        async with stub.running() as agent:
            StubEnv.control(stub, guest_files={"/etc/hosts": "127.0.0.1 localhost\n"})
            await pool_of_one(agent, "q")
            StubEnv.control(stub, set_time_delay=3)
            t0 = time.monotonic()
            st = await call(agent, "create", name="quick", pool="q", ssh_keys=[KEY])
            took = time.monotonic() - t0
            vm = agent.registry.get("quick")
            assert st["handover"]["identity"] == "guest agent"
            assert took < 3, took
            # written before the take returned; the guest takes it a moment later
            log = await until(lambda: [e for e in StubEnv.log(vm.run_dir, "qga")
                                       if e["execute"] == "guest-set-time"]
                              and StubEnv.log(vm.run_dir, "qga"), 2, "the clock set")
            assert log[-1]["execute"] == "guest-set-time", log[-3:]
            assert await vm.agent.ping(timeout=10)      # its turn after the clock's
    run(body(), timeout=60)


def test_a_take_by_the_pools_creator_uses_the_guest_agents_file_commands(stub):
    async def body():
        async with stub.running() as agent:
            StubEnv.control(stub, guest_files={
                "/etc/hosts": "127.0.0.1 localhost\n127.0.1.1 old old\n"})
            member = await pool_of_one(agent, "q")
            run_dir = agent.registry.get(member).run_dir
            perl_before = [e for e in StubEnv.log(run_dir, "qga")
                           if e["execute"] == "guest-exec"]
            st = await call(agent, "create", name="quick", pool="q", ssh_keys=[KEY])
            assert st["handover"]["identity"] == "guest agent"
            run_dir = agent.registry.get("quick").run_dir
            await until(lambda: any(e["execute"] == "guest-set-time"
                                    for e in StubEnv.log(run_dir, "qga")), 2, "the clock")
            log = StubEnv.log(run_dir, "qga")
            assert [e for e in log if e["execute"] == "guest-exec"] == perl_before
            opened = [e["arguments"]["path"] for e in log
                      if e["execute"] == "guest-file-open"
                      and e["arguments"]["mode"] == "w"]
            user = st["ssh_user"]
            assert opened == ["/proc/sys/kernel/hostname", "/etc/hostname", "/etc/hosts",
                              f"/home/{user}/.ssh/authorized_keys"]
            written = [base64.b64decode(e["arguments"]["buf-b64"]).decode()
                       for e in log if e["execute"] == "guest-file-write"]
            assert written[:3] == ["quick\n", "quick\n",
                                   "127.0.0.1 localhost\n127.0.1.1 quick quick\n"]
            assert KEY in written[3] and "vmagent-pool-warmup" not in written[3]
    run(body(), timeout=60)
