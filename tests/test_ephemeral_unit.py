"""Ephemeral VMs and TTLs (vmagent/vms/ephemeral.py, the spec fields) against the QMP
stub: deleted when the guest powers off, when powered off by the API, at the agent's
next start, and when the TTL passes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stub_helpers import (StubEnv, call, create, read_state, run, stub,  # noqa: F401
                          until, update_json)
from vmagent.errors import BadRequest
from vmagent.spec import VMSpec, format_duration, parse_duration
from vmagent.vms import ephemeral


@pytest.mark.parametrize("text,seconds", [
    ("2h", 7200), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("45", 45), (3600, 3600),
    ("1d", 86400), ("2H", 7200), ("1.5h", 5400), (" 10m ", 600), ("1w", 604800)])
def test_ttl_parsing(text, seconds):
    assert parse_duration(text, "ttl") == seconds


@pytest.mark.parametrize("bad", ["", "x", "0", "-5", "31d", True, "2hh", "h", "5 minutes",
                                 None, [], "1h-5m"])
def test_ttl_parsing_refuses_nonsense_with_a_clear_message(bad):
    with pytest.raises(BadRequest) as e:
        parse_duration(bad, "ttl")
    assert e.value.message.startswith("ttl: ")
    assert "2h" in e.value.message or "out of range" in e.value.message


def test_duration_formatting():
    assert [format_duration(s) for s in (7200, 5400, 45, 86400 + 61)] == \
        ["2h", "1h30m", "45s", "1d1m1s"]


def test_spec_fields_ephemeral_and_ttl():
    spec = VMSpec.from_dict({"name": "a", "ephemeral": True, "ttl": "2h"})
    assert spec.ephemeral is True and spec.ttl == 7200
    assert VMSpec.from_dict({"name": "a"}).ephemeral is False
    assert VMSpec.from_dict({"name": "a", "ephemeral": "false"}).ephemeral is False
    with pytest.raises(BadRequest, match="ephemeral: expected true or false"):
        VMSpec.from_dict({"name": "a", "ephemeral": "yes"})
    with pytest.raises(BadRequest, match="ttl: cannot parse"):
        VMSpec.from_dict({"name": "a", "ttl": "soon"})


def test_created_epoch():
    assert ephemeral.created_epoch("1970-01-01T00:01:00Z") == 60.0
    assert ephemeral.created_epoch("") is None


def test_ephemeral_vm_whose_guest_powers_off_is_deleted(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "e1", ephemeral=True)
            assert st["ephemeral"] is True and st["expires_at"] is None
            await create(agent, "keep1")
            run_dir = Path(st["run_dir"])
            StubEnv.vm_control(run_dir, poweroff=True)
            StubEnv.vm_control(Path(agent.registry.get("keep1").run_dir), poweroff=True)

            async def gone() -> bool:
                await agent.monitor.round()
                await agent.ephemeral.settle()
                return "e1" not in agent.registry
            await until(gone, what="the ephemeral VM deleted")
            assert not run_dir.exists()                     # disk and all
            # a VM that is not ephemeral is only stopped
            await until(lambda: agent.registry.get("keep1").rec.rt.state.value
                        == "stopped", what="keep1 stopped")
            assert "keep1" in agent.registry
    run(body())


def test_ephemeral_vm_powered_off_through_the_api_is_deleted(stub):
    async def body():
        async with stub.running() as agent:
            await create(agent, "e2", ephemeral=True)
            await call(agent, "poweroff", name="e2")
            await agent.ephemeral.settle()
            assert "e2" not in agent.registry
            assert (await call(agent, "list"))["vms"] == []
    run(body())


def test_ephemeral_vm_that_powered_off_while_the_agent_was_down_goes_at_start(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "e3", ephemeral=True)
            await create(agent, "plain")
        run_dir = Path(st["run_dir"])
        # the agent is down; the guest powers off (qemu exits)
        StubEnv.vm_control(run_dir, poweroff=True)
        await until(lambda: not (run_dir / "qemu.pid").exists() or
                    agent.registry.get("e3").machine.pid() is None,
                    what="qemu of e3 gone")
        async with stub.running() as again:
            assert "e3" not in again.registry and not run_dir.exists()
            assert "plain" in again.registry
    run(body())


def test_ttl_deletes_a_forgotten_vm(stub):
    async def body():
        async with stub.running() as agent:
            agent.ephemeral.interval = 0.1
            st = await create(agent, "t1", ttl=3600)
            assert st["expires_at"] == pytest.approx(time.time() + 3600, abs=5)
            await create(agent, "t2", ttl="2h")
            # its creation an hour ago: its TTL has passed
            vm = agent.registry.get("t1")
            vm.rec.rt.created = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                              time.gmtime(time.time() - 3601))
            agent.registry.save(vm)
            await until(lambda: "t1" not in agent.registry, timeout=10,
                        what="the expired VM deleted")
            assert "t2" in agent.registry
    run(body())


def test_expired_while_the_agent_was_down_goes_at_start(stub):
    async def body():
        async with stub.running() as agent:
            st = await create(agent, "t3", ttl=60)
        update_json(Path(st["run_dir"]) / "state.json", {"created": "2020-01-01T00:00:00Z"})
        async with stub.running() as again:
            assert "t3" not in again.registry
    run(body())


def test_a_vm_being_created_is_left_to_its_create(stub):
    async def body():
        async with stub.running() as agent:
            await create(agent, "c1", ephemeral=True)
            vm = agent.registry.get("c1")
            vm.rec.rt.creating = True
            assert ephemeral.due(vm, time.time() + 10 ** 9) is None
            vm.rec.rt.creating = False
            assert ephemeral.due(vm, time.time()) is None      # running: not due
            assert read_state(vm.run_dir)["state"] == "running"
    run(body())
