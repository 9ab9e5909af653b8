"""Allocation in the agent, below the HTTP layer, with the qemu stub (tests/qemu_stub.py)
and a cgroup v1 tree in a temporary directory: admission (refusals with the numbers
that leave nothing, creates in flight, stopped VMs keep their room), the VM's cgroup
(made before qemu starts, qemu inside it from its first instruction, limits changed at
once, removed when it stops or is deleted, checked after re-adoption), segments and
GPUs, and the host report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from alloc_helpers import config, pci_device, v1_tree, v2_tree
from stub_helpers import StubEnv, call, create, make_template, run, stub  # noqa: F401
from vmagent import rundir
from vmagent.alloc.gpu import Sysfs
from vmagent.errors import BadRequest, Conflict

pytestmark = pytest.mark.timeout(120)

M, G = 1 << 20, 1 << 30
# the stub env's defaults: 1 vCPU, 256M guest RAM; + 256M overhead = 512M per VM.
# host-a: 2 cores - 0.5 reserve = 1.5 allocatable; 4G - 1G = 3G allocatable


@pytest.fixture
def cg(tmp_path) -> Path:
    return v1_tree(tmp_path / "cg")


def agent_of(stub: StubEnv, cg_root: Path, **kw):
    return stub.running(config=config(cg_root, **kw))


def cgroup_dir(cg_root: Path, ctrl: str, name: str) -> Path:
    return cg_root / ctrl / "vmagent" / name


def pid_of(st: dict) -> int:
    return int((Path(st["run_dir"]) / rundir.PIDFILE).read_text())


# --- admission --------------------------------------------------------------------------

def test_a_create_that_does_not_fit_is_refused_with_the_numbers_and_leaves_nothing(
        stub, cg):
    async def body():
        async with agent_of(stub, cg) as agent:
            with pytest.raises(Conflict) as exc:
                await create(agent, "big", segment="default", cpu_guarantee=4)
            assert exc.value.message == "cpu_guarantee 4 > 1.5 cores free on host-a"
            assert exc.value.details["refused"] == "capacity"
            with pytest.raises(Conflict, match=r"ram_guarantee 8G > 3G free on host-a"):
                await create(agent, "big", ram_guarantee="8G")
            assert not (stub.state_dir / "vms" / "big").exists()
            assert not (cg / "cpu" / "vmagent").exists()
            assert (await call(agent, "list"))["vms"] == []
            assert agent.alloc.ledger.in_flight == {}
            host = await call(agent, "host")
            assert host["resources"]["cpu"]["guaranteed"] == 0
    run(body())
    assert stub.started_pids() == []


def test_nonsense_is_refused_before_anything(stub, cg):
    async def body():
        async with agent_of(stub, cg) as agent:
            with pytest.raises(BadRequest, match="does not fit under ram_limit"):
                await create(agent, "vm1", memory="1G", ram_limit="1G")
            with pytest.raises(BadRequest, match="no CPU limit"):
                await create(agent, "vm1", cpu_limit=1)
            with pytest.raises(BadRequest, match="at most 2 cores"):
                await create(agent, "vm1", cpu_guarantee=3)
            assert (await call(agent, "list"))["vms"] == []
    run(body())


def test_stopped_vms_keep_their_guarantees_until_deleted(stub, cg):
    async def body():
        async with agent_of(stub, cg) as agent:
            st = await create(agent, "a", start=False, cpu_guarantee=1)
            assert st["state"] == "stopped"
            host = await call(agent, "host")
            assert host["resources"]["cpu"]["guaranteed"] == 1
            assert host["resources"]["cpu"]["free"] == 0.5
            assert host["resources"]["memory"]["guaranteed"] == 512 * M
            with pytest.raises(Conflict, match="cpu_guarantee 1 > 0.5 cores free"):
                await create(agent, "b", cpu_guarantee=1)
            assert not cgroup_dir(cg, "cpu", "a").exists()      # not running: no cgroup
            await call(agent, "start", name="a")                # its room was kept
            await call(agent, "delete", name="a")
            await create(agent, "b", cpu_guarantee=1)
    run(body())


def test_concurrent_creates_cannot_overcommit(stub, cg):
    """Each of the three fits alone; the host holds two. The agent counts a create's
    reservation from its admission, so the third is refused whatever the timing."""
    async def body():
        async with agent_of(stub, cg) as agent:
            results = await asyncio.gather(
                *(create(agent, f"c{i}", ram_limit="1500M")
                  for i in range(3)), return_exceptions=True)
            ok = [r for r in results if isinstance(r, dict)]
            refused = [r for r in results if isinstance(r, Conflict)]
            assert len(ok) == 2 and len(refused) == 1, results
            assert "ram_guarantee 1500M > 72M free on host-a" in refused[0].message
            assert agent.alloc.ledger.in_flight == {}
            assert len(agent.registry) == 2
    run(body())


def test_dry_run_shows_the_allocation_and_is_refused_like_the_create(stub, cg):
    async def body():
        async with agent_of(stub, cg) as agent:
            dry = await create(agent, "vm1", dry_run=True, segment="default",
                               cpu_guarantee=0.5, cpu_limit=1)
            alloc = dry["allocation"]
            assert alloc["host"] == "host-a" and alloc["enforcement"] == "v1"
            assert alloc["demand"] == {"cpu": 0.5, "ram": 512 * M, "gpus": 0}
            assert alloc["limits"]["cpu_limit"] == 1 and alloc["cgroup"] == "/vmagent/vm1"
            assert dry["spec"]["ram_limit"] == 512 * M
            with pytest.raises(Conflict, match="cpu_guarantee 2 > 1.5"):
                await create(agent, "vm1", dry_run=True, segment="default",
                             cpu_guarantee=2)
            assert agent.alloc.ledger.in_flight == {}
    run(body())


# --- the cgroup through a VM's life -----------------------------------------------------

def test_qemu_starts_inside_its_cgroup_with_the_limits(stub, cg):
    async def body():
        async with agent_of(stub, cg) as agent:
            st = await create(agent, "vm1", segment="default", cpu_guarantee=0.5,
                              cpu_limit=0.75, memory="256M", ram_guarantee="300M")
            pid = pid_of(st)
            cpu, mem = cgroup_dir(cg, "cpu", "vm1"), cgroup_dir(cg, "memory", "vm1")
            assert (cpu / "cpu.shares").read_text() == "512"
            assert (cpu / "cpu.cfs_quota_us").read_text() == "75000"
            assert (mem / "memory.limit_in_bytes").read_text() == str(512 * M)
            assert (mem / "memory.soft_limit_in_bytes").read_text() == str(300 * M)
            for ctrl in ("cpu", "cpuacct", "memory"):
                procs = (cgroup_dir(cg, ctrl, "vm1") / "cgroup.procs").read_text().split()
                assert str(pid) in procs, (ctrl, procs)
            argv = json.loads((Path(st["run_dir"]) / rundir.ARGV).read_text())
            assert argv[0] == str(stub.qemu)        # the saved argv is qemu's own
            status = await call(agent, "status", name="vm1")
            assert status["allocation"]["cgroup"] == "/vmagent/vm1"
            assert status["allocation"]["cgroup_values"]["cpu.cfs_quota_us"] == "75000"
    run(body())


def test_push_config_applies_limits_to_a_running_vm_at_once(stub, cg):
    async def body():
        async with agent_of(stub, cg) as agent:
            await create(agent, "vm1", segment="default", cpu_limit=1)
            cpu = cgroup_dir(cg, "cpu", "vm1")
            st = await call(agent, "push_config", name="vm1", cpu_limit=0.5,
                            cpu_guarantee=0.25, ram_limit="1G")
            assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
            assert (cpu / "cpu.shares").read_text() == "256"
            assert (cgroup_dir(cg, "memory", "vm1") / "memory.limit_in_bytes"
                    ).read_text() == str(G)
            assert st["limits_applied"]["cpu_limit"] == 0.5
            assert st["spec"]["cpu_limit"] == 0.5
            # a larger guarantee that does not fit: 409, nothing changed
            with pytest.raises(Conflict, match="cpu_guarantee 2 > 1.5 cores free"):
                await call(agent, "push_config", name="vm1", cpu_guarantee=2,
                           cpu_limit=2)
            assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
            assert agent.registry.get("vm1").rec.spec.cpu_guarantee == 0.25
    run(body())


def test_a_smaller_memory_pushed_to_a_running_vm_keeps_room_for_the_running_guest(
        stub, cg):
    async def body():
        async with agent_of(stub, cg) as agent:
            await create(agent, "vm1", memory="512M")
            st = await call(agent, "push_config", name="vm1", memory="256M")
            assert st["spec"]["ram_limit"] == 512 * M          # at its next start
            assert st["limits_applied"]["ram_limit"] == 768 * M  # the running 512M + 256M
            limit = cgroup_dir(cg, "memory", "vm1") / "memory.limit_in_bytes"
            assert limit.read_text() == str(768 * M)
            await call(agent, "hard_reset", name="vm1")
            assert limit.read_text() == str(512 * M)
    run(body())


def test_the_cgroup_goes_when_the_vm_stops_or_is_deleted(stub, cg):
    stub.control(guest_agent="absent")

    async def body():
        async with agent_of(stub, cg) as agent:
            await create(agent, "a")
            await create(agent, "b")
            assert cgroup_dir(cg, "cpu", "a").is_dir()
            await call(agent, "poweroff", name="a")
            assert not cgroup_dir(cg, "cpu", "a").exists()
            await call(agent, "start", name="a")
            assert cgroup_dir(cg, "memory", "a").is_dir()
            await call(agent, "delete", name="a")
            assert not cgroup_dir(cg, "memory", "a").exists()
            await call(agent, "delete", name="b")
            assert not (cg / "cpu" / "vmagent").exists()
    run(body())


def test_readoption_checks_the_cgroup_and_moves_a_qemu_that_is_outside(stub, cg):
    async def body():
        async with agent_of(stub, cg) as agent:
            st = await create(agent, "vm1", segment="default", cpu_limit=0.5)
        pid = pid_of(st)
        # as if an agent from before cgroups had started it: no cgroup at all
        for ctrl in ("cpu", "cpuacct", "memory"):
            d = cgroup_dir(cg, ctrl, "vm1")
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
        async with agent_of(stub, cg) as again:
            assert again.registry.get("vm1").machine.pid() == pid
            for ctrl in ("cpu", "cpuacct", "memory"):
                procs = (cgroup_dir(cg, ctrl, "vm1") / "cgroup.procs").read_text()
                assert procs.split() == [str(pid)], ctrl
            assert (cgroup_dir(cg, "cpu", "vm1") / "cpu.cfs_quota_us").read_text() \
                == "50000"
    run(body())


def test_a_leftover_cgroup_of_a_vm_that_is_not_running_is_swept(stub, cg):
    async def body():
        async with agent_of(stub, cg) as agent:
            await create(agent, "vm1", start=False)
        for ctrl in ("cpu", "memory"):
            cgroup_dir(cg, ctrl, "ghost").mkdir(parents=True)
        async with agent_of(stub, cg):
            assert not cgroup_dir(cg, "cpu", "ghost").exists()
    run(body())


def test_the_v2_backend_in_the_agent(stub, tmp_path):
    root = v2_tree(tmp_path / "v2")

    async def body():
        async with stub.running(config=config(root, mode="v2")) as agent:
            st = await create(agent, "vm1", segment="default", cpu_limit=0.5,
                              cpu_guarantee=0.5)
            d = root / "vmagent" / "vm1"
            assert (d / "cpu.max").read_text() == "50000 100000"
            assert (d / "cpu.weight").read_text() == "50"
            assert (d / "memory.max").read_text() == str(512 * M)
            assert (d / "memory.min").read_text() == str(512 * M)
            assert str(pid_of(st)) in (d / "cgroup.procs").read_text().split()
            await call(agent, "delete", name="vm1")
            assert not d.exists()
    run(body())


# --- segments and GPUs ------------------------------------------------------------------

def test_a_segment_the_host_does_not_serve_is_refused(stub, cg):
    async def body():
        async with agent_of(stub, cg, segments=("default",)) as agent:
            with pytest.raises(Conflict) as exc:
                await create(agent, "vm1")          # dev, the default segment
            assert exc.value.message == ("segment dev is not served by host-a (it "
                                         "serves default)")
            with pytest.raises(Conflict, match="gpus 1 > 0 free on host-a \\(it has no "
                               "GPUs in its config\\)|not served"):
                await create(agent, "vm1", segment="gpu-dev")
            host = await call(agent, "host")
            assert host["segments"] == ["default"] and host["name"] == "host-a"
    run(body())


def test_gpu_dev_without_gpus_is_refused_clearly(stub, cg):
    async def body():
        async with agent_of(stub, cg, segments=("dev", "gpu-dev")) as agent:
            with pytest.raises(Conflict) as exc:
                await create(agent, "vm1", segment="gpu-dev")
            assert exc.value.message == ("gpus 1 > 0 free on host-a (it has no GPUs in "
                                         "its config)")
    run(body())


def test_gpus_are_passed_through_and_counted(stub, cg, tmp_path):
    sys_dir, dev_dir = tmp_path / "sys", tmp_path / "dev"
    pci_device(sys_dir, dev_dir, "0000:65:00.0", group="7")
    pci_device(sys_dir, dev_dir, "0000:66:00.0", driver="nvidia", group="8")

    async def body():
        async with agent_of(stub, cg, gpus=("0000:65:00.0", "0000:66:00.0")) as agent:
            agent.alloc.sysfs = Sysfs(sys_dir, dev_dir)
            host = await call(agent, "host")
            devices = {d["address"]: d for d in host["resources"]["gpu"]["devices"]}
            assert devices["0000:65:00.0"]["ready"] is True
            assert "bound to nvidia, not vfio-pci" in devices["0000:66:00.0"]["problem"]
            assert host["segments"] == ["dev", "default", "gpu-dev"]
            st = await create(agent, "g1", segment="gpu-dev")
            argv = json.loads((Path(st["run_dir"]) / rundir.ARGV).read_text())
            assert "vfio-pci,host=0000:65:00.0,id=gpu0" in argv
            status = await call(agent, "status", name="g1")
            assert status["allocation"]["gpus"] == ["0000:65:00.0"]
            # the second GPU is counted, but it cannot be passed through: the start
            # fails with the reason and no VM is left
            with pytest.raises(Conflict, match="bound to nvidia"):
                await create(agent, "g2", segment="gpu-dev")
            assert "g2" not in agent.registry
            with pytest.raises(Conflict, match="gpus 3 > 1 free on host-a"):
                await create(agent, "g3", segment="gpu-dev", gpus=3)
            await call(agent, "delete", name="g1")
            host = await call(agent, "host")
            assert host["resources"]["gpu"]["free"] == 2
    run(body())


# --- warm creates -----------------------------------------------------------------------

def test_a_warm_create_is_admitted_with_the_templates_memory(stub, cg):
    async def body():
        async with agent_of(stub, cg, memory=2 * G) as agent:   # 1G allocatable
            await make_template(agent)                          # 256M + 256M
            await create(agent, "w1", template="tpl")
            with pytest.raises(Conflict, match="ram_guarantee 512M > 512M|> 512M free"):
                await create(agent, "w2", template="tpl", ram_guarantee="600M",
                             ram_limit="600M")
            with pytest.raises(BadRequest, match="does not fit under ram_limit"):
                await create(agent, "w3", template="tpl", ram_limit="400M")
            assert cgroup_dir(cg, "memory", "w1").is_dir()
    run(body())


# --- the kernel's cgroups (v1 here) -----------------------------------------------------

def test_on_this_hosts_cgroups_the_daemonized_qemu_is_inside_from_the_start(
        stub, caplog):
    """With the real cgroup v1 file system: the wrapper puts qemu in before it runs, and
    the process -daemonize forks inherits it, so nothing has to be moved."""
    from vmagent.alloc.cgroupfs import V1
    if V1.usable(Path("/sys/fs/cgroup")) is not None:
        pytest.skip("needs root and cgroup v1 controllers at /sys/fs/cgroup")
    root = Path("/sys/fs/cgroup")

    async def body():
        async with agent_of(stub, root, cpus=2, memory=4 * G) as agent:
            parent = agent.alloc.cgroups.parent
            st = await create(agent, "vm1", segment="default", cpu_limit=0.5)
            pid = pid_of(st)
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            where = {ln.split(":")[1]: ln.split(":")[2] for ln in lines}
            for ctrl in ("cpu", "cpuacct", "memory"):
                assert where[ctrl] == f"/{parent}/vm1", (ctrl, where)
            for tid in Path(f"/proc/{pid}/task").iterdir():
                tasks = (root / "cpu" / parent / "vm1" / "tasks").read_text().split()
                assert tid.name in tasks
            assert (root / "cpu" / parent / "vm1" / "cpu.cfs_quota_us").read_text() \
                .strip() == "50000"
            assert "moving it in" not in caplog.text
            await call(agent, "delete", name="vm1")
            assert not (root / "cpu" / parent / "vm1").exists()
    run(body())
