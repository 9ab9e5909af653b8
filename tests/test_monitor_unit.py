"""The monitor below the HTTP layer, against the QMP stub (tests/qemu_stub.py): signals,
broken VMs found, the restart policy with its backoff and crash-loop cap, the metrics
and unistat forms, the operation latency guard and the metrics role."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

from stub_helpers import CTX, StubEnv, call, create, run, stub, until  # noqa: F401
from vmagent.alloc.config import AgentConfig, CgroupConfig, MonitorConfig
from vmagent.context import Caller, RequestContext, Role, Transport
from vmagent.errors import Forbidden
from vmagent.monitor import healing, health, unistat
from vmagent.monitor.healing import Healer, plan
from vmagent.monitor.model import Histogram, Metric
from vmagent.vms.lifecycle import PANICKED
from vmagent.vms.state import State

PROMTOOL = "/usr/bin/promtool"
CFG = MonitorConfig()


def fast(**kw) -> AgentConfig:
    """An agent config whose monitor restarts at once (backoff 0.05 s)."""
    mon = dict(restart_backoff=0.05, restart_backoff_max=0.2, crash_loop_restarts=3,
               crash_loop_window=600.0, qmp_timeout=0.5, link_down_warning=0.3,
               link_timeout=0.3, net_timeout=0.3)
    mon.update(kw)
    return AgentConfig(cgroup=CgroupConfig(mode="none"), monitor=MonitorConfig(**mon))


async def rounds(agent, until_fn, timeout: float = 10.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while True:
        await agent.monitor.round()
        got = until_fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"not {what} after {timeout:g}s"
        await _pause(0.05)


async def _pause(seconds: float) -> None:
    import asyncio
    await asyncio.sleep(seconds)


def state_of(agent, name: str = "vm1") -> State:
    return agent.registry.get(name).rec.rt.state


# --- pure parts ------------------------------------------------------------------------

def test_diagnose_names_what_is_wrong():
    d = lambda **kw: health.diagnose(**{"status": "running", "qmp_silent": 0,  # noqa
                                        "link_down": 0, "io_error": None,
                                        "panicked": False, "cfg": CFG, **kw})
    assert d() == health.Finding()
    assert d(status="paused") == health.Finding()             # stopped by someone
    assert d(panicked=True).broken == PANICKED
    assert d(status="guest-panicked").broken == PANICKED
    io = d(status="io-error", io_error={"node-name": "hd0", "operation": "write",
                                        "nospace": True, "reason": "No space left on device"})
    assert io.broken == "paused by an I/O error: write on hd0: No space left on device"
    assert "QMP not answering for 10s" in d(qmp_silent=10).broken
    assert d(qmp_silent=9.9).broken is None
    assert "link down for 30s" in d(link_down=30).warning and d(link_down=30).broken is None


def test_plan_backs_off_and_caps_a_crash_loop():
    now = 10_000.0
    assert plan("never", State.BROKEN, [], now, CFG) == healing.Plan(False)
    assert plan("on-failure", State.STOPPED, [], now, CFG) == healing.Plan(False)
    assert plan("always", State.STOPPED, [], now, CFG).restart
    delays = [plan("on-failure", State.BROKEN, [now - 1] * n, now, CFG).delay
              for n in range(5)]
    assert delays == [1, 2, 4, 8, 16]
    capped = plan("on-failure", State.BROKEN, [now - 1] * 5, now, CFG, reason="died")
    assert not capped.restart
    assert capped.reason == "crash loop: 5 restarts within 600s; last: died"
    # restarts older than the window do not count
    assert plan("on-failure", State.BROKEN, [now - 700] * 5, now, CFG).delay == 1
    big = MonitorConfig(crash_loop_restarts=50)
    assert plan("always", State.BROKEN, [now] * 20, now, big).delay == big.restart_backoff_max


def test_restart_policy_defaults_by_segment():
    from vmagent.spec import VMSpec, apply_defaults
    assert apply_defaults(VMSpec.from_dict({"name": "a", "segment": "default"})).restart \
        == "on-failure"
    assert apply_defaults(VMSpec.from_dict({"name": "a"})).restart == "never"
    assert VMSpec.from_dict({"name": "a", "restart": "always"}).restart_policy == "always"
    assert VMSpec(name="a", segment="default").restart_policy == "on-failure"
    from vmagent.errors import BadRequest
    with pytest.raises(BadRequest, match="restart: 'sometimes' is not one of never, "
                                         "on-failure, always"):
        VMSpec.from_dict({"name": "a", "restart": "sometimes"})


def test_histogram_forms():
    h = Histogram(bounds=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3):
        h.observe(v)
    assert h.counts == [2, 1, 1] and h.count == 4 and h.sum == pytest.approx(3.65)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.weights() == [[0.0, 2], [0.1, 1], [1.0, 1]]


def test_unistat_suffixes_and_tags():
    g = Metric("link_alive", "gauge", "", ("vm", "owner", "segment"))
    g.add(1, "web1", "alice", "dev")
    c = Metric("vmagent_vm_restarts", "counter", "", ("vm",))
    c.add(3, "web1")
    u = Metric("vmagent_vm_uptime_seconds", "gauge", "", ("vm",))
    u.add(12.5, "we b")
    h = Metric("vmagent_operation_duration_seconds", "histogram", "", ("op", "result"))
    hist = Histogram(bounds=(1.0,))
    hist.observe(0.5)
    h.add(hist, "status", "ok")
    assert unistat.signals([g, c, u, h]) == [
        ["vm=web1;owner=alice;segment=dev;link_alive_ammv", 1],
        ["vm=web1;vm_restarts_total_dmmm", 3],
        ["vm=we_b;vm_uptime_seconds_axxx", 12.5],
        ["op=status;result=ok;operation_duration_seconds_dhhh", [[0.0, 1], [1.0, 0]]],
    ]


# --- the monitor against the stub ---------------------------------------------------------

def test_signals_follow_the_guest_agent_and_sshd(stub):
    async def body():
        async with stub.running(config=fast()) as agent:
            st = await create(agent, "vm1")
            await rounds(agent, lambda: agent.registry.get("vm1").link_alive, what="link")
            vm = agent.registry.get("vm1")
            assert vm.net_alive
            StubEnv.vm_control(st["run_dir"], ssh="silent")
            await rounds(agent, lambda: not vm.net_alive, what="net down")
            assert vm.link_alive
            StubEnv.vm_control(st["run_dir"], ssh="banner", guest_agent="silent")
            await rounds(agent, lambda: vm.net_alive and not vm.link_alive,
                         what="link down, net up")
            # the link down long enough: a warning, once, and an event; then cleared
            await rounds(agent, lambda: vm.warning, what="a warning")
            assert "link down" in vm.warning and state_of(agent) == State.RUNNING
            st = await call(agent, "status", name="vm1")
            assert st["warning"] and not st["link_alive"] and st["net_alive"]
            StubEnv.vm_control(st["run_dir"], guest_agent="on")
            await rounds(agent, lambda: vm.warning is None and vm.link_alive,
                         what="the warning cleared")
            kinds = [e["type"] for e in vm.event_log.read()]
            assert kinds.count("warning") == 1 and kinds.count("warning_cleared") == 1
    run(body(), timeout=60)


def test_a_hung_guest_costs_its_own_check_only(stub):
    """One VM's checks time out; another VM's go on, and the round does not wait."""
    async def body():
        async with stub.running(config=fast(link_timeout=2.0, net_timeout=2.0,
                                            qmp_timeout=60)) as agent:
            a = await create(agent, "vm1")
            await create(agent, "vm2")
            StubEnv.vm_control(a["run_dir"], hang=True, ssh="silent")
            t0 = time.monotonic()
            await agent.monitor.tick()
            assert time.monotonic() - t0 < 0.5          # the tick starts tasks only
            await rounds(agent, lambda: agent.registry.get("vm2").link_alive,
                         what="vm2's link")
            assert not agent.registry.get("vm1").link_alive
    run(body(), timeout=60)


def test_qmp_silent_is_broken_and_restarted(stub):
    async def body():
        async with stub.running(config=fast()) as agent:
            st = await create(agent, "vm1", restart="on-failure")
            await rounds(agent, lambda: agent.registry.get("vm1").link_alive)
            StubEnv.vm_control(st["run_dir"], hang=True)
            vm = agent.registry.get("vm1")
            await rounds(agent, lambda: vm.rec.rt.restarts == 1, what="restarted")
            reasons = [e.get("reason") for e in vm.event_log.read() if e["type"] == "state"
                       and e["to"] == "broken"]
            assert reasons and "QMP not answering" in reasons[-1]
    run(body(), timeout=60)


def test_io_error_is_broken_with_the_reason(stub):
    async def body():
        async with stub.running(config=fast()) as agent:
            st = await create(agent, "vm1", restart="never")
            await agent.monitor.round()
            StubEnv.vm_control(st["run_dir"], io_error=True)
            await rounds(agent, lambda: state_of(agent) == State.BROKEN, what="broken")
            st = await call(agent, "status", name="vm1")
            assert st["reason"] == ("paused by an I/O error: write on hd0: No space left "
                                    "on device")
            assert st["restarts"] == 0 and st["restart"] == "never"
            # never restarted; start (an operator) kills the paused qemu and starts anew
            old = agent.registry.get("vm1").machine.pid()
            for _ in range(3):
                await agent.monitor.round()
            assert state_of(agent) == State.BROKEN
            st = await call(agent, "start", name="vm1")
            assert st["state"] == "running" and st["pid"] != old
    run(body(), timeout=60)


def test_kill_restart_backoff_and_crash_loop(stub):
    async def body():
        async with stub.running(config=fast()) as agent:
            st = await create(agent, "vm1", restart="on-failure")
            vm = agent.registry.get("vm1")
            for n in range(1, 4):
                stub.kill(vm.machine.pid())
                await rounds(agent, lambda: vm.rec.rt.restarts == n
                             and state_of(agent) == State.RUNNING, what=f"restart {n}")
            stub.kill(vm.machine.pid())
            await rounds(agent, lambda: "crash loop" in (vm.rec.rt.reason or ""),
                         what="the crash loop")
            assert state_of(agent) == State.BROKEN
            for _ in range(5):
                await agent.monitor.round()
                await _pause(0.05)
            assert state_of(agent) == State.BROKEN and vm.rec.rt.restarts == 3
            kinds = [e["type"] for e in vm.event_log.read()]
            assert kinds.count("restart") == 3 and kinds.count("crash_loop") == 1
            saved = json.loads((Path(st["run_dir"]) / "state.json").read_text())
            assert saved["restarts"] == 3 and len(saved["restart_times"]) == 3
            # an operator's start clears it: the policy applies again
            await call(agent, "start", name="vm1")
            assert vm.rec.rt.restart_times == []
            stub.kill(vm.machine.pid())
            await rounds(agent, lambda: vm.rec.rt.restarts == 4
                         and state_of(agent) == State.RUNNING, what="restarted again")
    run(body(), timeout=90)


def test_a_qemu_death_is_seen_without_waiting_for_the_next_round(stub):
    """qemu's QMP stream ends when it dies: the monitor looks as soon as the process
    is gone, not at its next round (here 60 s away), and the VM's last events are not
    waited for (its event stream ends with the connection)."""
    async def body():
        async with stub.running(watch=True, config=fast(interval=60.0)) as agent:
            await create(agent, "vm1", restart="never")
            vm = agent.registry.get("vm1")
            await agent.monitor.round()             # watched from now on
            stub.kill(vm.machine.pid())
            await until(lambda: state_of(agent) == State.BROKEN, 10, "broken")
            assert "exited unexpectedly" in vm.rec.rt.reason
    run(body(), timeout=60)


def test_a_vm_its_owner_stopped_is_never_restarted(stub):
    async def body():
        async with stub.running(config=fast(restart_backoff=0.5)) as agent:
            st = await create(agent, "vm1", restart="always")
            vm = agent.registry.get("vm1")
            await call(agent, "poweroff", name="vm1")
            for _ in range(5):
                await agent.monitor.round()
            assert state_of(agent) == State.STOPPED and vm.rec.rt.restarts == 0
            # broken, and while its restart is due its owner stops it: not restarted
            await call(agent, "start", name="vm1")
            stub.kill(vm.machine.pid())
            await rounds(agent, lambda: state_of(agent) == State.BROKEN)
            assert agent.monitor.healer.pending() == ["vm1"]
            await call(agent, "poweroff", name="vm1")
            await _pause(0.6)
            await agent.monitor.round()
            assert state_of(agent) == State.STOPPED and vm.rec.rt.restarts == 0
            assert agent.monitor.healer.pending() == []
            # the guest powering itself off: policy always restarts it
            await call(agent, "start", name="vm1")
            StubEnv.vm_control(st["run_dir"], poweroff=True)
            await rounds(agent, lambda: state_of(agent) == State.STOPPED)
            StubEnv.vm_control(st["run_dir"], poweroff=False)   # the next boot stays up
            await rounds(agent, lambda: vm.rec.rt.restarts == 1
                         and state_of(agent) == State.RUNNING, what="restarted")
    run(body(), timeout=60)


def test_a_vm_found_dead_at_agent_start_is_restarted_by_its_policy(stub):
    async def body():
        async with stub.running(config=fast()) as agent:
            st = await create(agent, "vm1", restart="on-failure")
            await create(agent, "vm2", restart="never")
            pids = [agent.registry.get(n).machine.pid() for n in ("vm1", "vm2")]
        for pid in pids:                      # the host "rebooted" while the agent was away
            stub.kill(pid)
        async with stub.running(watch=True, config=fast()) as agent:
            assert state_of(agent, "vm2") == State.BROKEN
            await until(lambda: state_of(agent, "vm1") == State.RUNNING
                        and agent.registry.get("vm1").rec.rt.restarts == 1,
                        timeout=10, what="vm1 restarted")
            assert state_of(agent, "vm2") == State.BROKEN
            assert Path(st["run_dir"]).exists()
    run(body(), timeout=60)


# --- metrics, unistat, the role -----------------------------------------------------------

def test_metrics_exposition_and_unistat(stub):
    async def body():
        async with stub.running(config=fast()) as agent:
            await create(agent, "vm1", segment="default")
            await rounds(agent, lambda: agent.registry.get("vm1").net_alive)
            with pytest.raises(Exception):
                await call(agent, "status", name="nope")
            text = await call(agent, "metrics")
            unis = await call(agent, "unistat")
            return text, unis
    text, unis = run(body(), timeout=60)
    assert 'link_alive{owner="' in text and 'vm="vm1"' in text
    line = next(ln for ln in text.splitlines() if ln.startswith("net_alive{"))
    assert 'segment="default"' in line and line.endswith(" 1.0")
    assert 'vmagent_vm_state{owner' in text and 'state="running"' in text
    assert 'vmagent_vms{state="running"} 1.0' in text
    assert 'vmagent_operation_duration_seconds_bucket{le="0.005",op="create",result="ok"}' \
        in text or 'op="create",result="ok"' in text
    assert 'op="status",result="not_found"' in text
    assert "vmagent_agent_info{" in text and "vmagent_host_resource{" in text
    assert "vmagent_vm_cpu_seconds_total{" in text and "vmagent_vm_memory_bytes{" in text
    if Path(PROMTOOL).exists():
        res = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                             capture_output=True, timeout=60)
        assert res.returncode == 0, (res.stdout + res.stderr).decode()
    names = {n for n, _ in unis}
    assert "vm=vm1;owner=root;segment=default;net_alive_ammv" in names or any(
        n.startswith("vm=vm1;") and n.endswith(";net_alive_ammv") or
        n.startswith("vm=vm1;") and n.endswith("net_alive_ammv") for n in names)
    assert "state=running;vms_ammv" in names
    assert any(n.endswith("operation_duration_seconds_dhhh") for n in names)
    json.dumps(unis)                                  # JSON as it is


def test_metrics_rows_are_for_operators_and_metrics_tokens(stub):
    async def body():
        async with stub.running() as agent:
            await create(agent, "vm1")
            scraper = RequestContext(Caller("prom", Role.METRICS), Transport.TCP)
            user = RequestContext(Caller("bob", Role.USER), Transport.TCP)
            assert "link_alive" in await agent.dispatcher.call("metrics", scraper, {})
            assert isinstance(await agent.dispatcher.call("unistat", scraper, {}), list)
            with pytest.raises(Forbidden, match="metrics token"):
                await agent.dispatcher.call("status", scraper, {"name": "vm1"})
            with pytest.raises(Forbidden, match="metrics token"):
                await agent.dispatcher.call("list", scraper, {})
            with pytest.raises(Forbidden, match="operators and metrics tokens"):
                await agent.dispatcher.call("metrics", user, {})
            assert await agent.dispatcher.call("metrics", CTX, {})
    run(body())


def test_events_since(stub):
    async def body():
        async with stub.running() as agent:
            await create(agent, "vm1")
            evs = (await call(agent, "events", name="vm1"))["events"]
            cut = evs[-2]["time"]
            later = (await call(agent, "events", name="vm1", since=cut))["events"]
            assert later == evs[-1:]
            from vmagent.errors import BadRequest
            with pytest.raises(BadRequest, match="since"):
                await call(agent, "events", name="vm1", since="yesterday")
    run(body())


def test_healer_forgets_what_changed():
    from types import SimpleNamespace
    rt = SimpleNamespace(state=State.BROKEN, restart_times=[], reason="x", changed_at=1.0,
                         restarts=0)
    vm = SimpleNamespace(name="a", rec=SimpleNamespace(
        rt=rt, spec=SimpleNamespace(restart_policy="on-failure")))
    h = Healer(MonitorConfig(restart_backoff=0.01))
    assert h.found(vm).restart and h.pending() == ["a"]
    rt.changed_at = 2.0                                   # someone acted
    assert not h.due(vm, time.monotonic() + 1) and h.pending() == []


# --- the Grafana dashboard -----------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[1] / "contrib" / "grafana" / \
    "vmagent-dashboard.json"


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def test_the_dashboard_uses_only_exported_metrics(stub):
    import re

    async def body():
        async with stub.running(config=fast()) as agent:
            await create(agent, "vm1")
            await agent.monitor.round()
            await call(agent, "status", name="vm1")
            return await call(agent, "metrics")
    text = run(body(), timeout=60)
    exported = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines()
                if ln and not ln.startswith("#")}
    families = {ln.split()[2]: ln.split()[3] for ln in text.splitlines()
                if ln.startswith("# TYPE ")}
    exported |= set(families)               # a family without samples yet (no jobs)
    exported |= {f + s for f, kind in families.items() if kind == "histogram"
                 for s in ("_bucket", "_count", "_sum")}
    for expr in dashboard_exprs():
        for name in re.findall(r"\b(link_alive|net_alive|vmagent_[a-z_]+)\b", expr):
            assert name in exported, (name, expr)


def test_a_slow_guest_gets_longer_timeouts_a_dead_one_is_seen_at_once():
    from vmagent.monitor.signals import Check
    c = Check("net", lambda vm, t: None, 1.0, adaptive_max=5.0)
    assert c.limit == 1.0
    c.recent = [0.1, 0.2]
    assert c.limit == 1.0                       # fast answers: the configured timeout
    c.recent = [2.0, 1.5]
    assert c.limit == 4.0                       # slow answers: twice the slowest
    c.recent, c.fails = [], 1
    assert c.limit == 2.0                       # failing: it may just be slow
    c.fails = 5
    assert c.limit == 5.0                       # at most adaptive_max
    assert Check("qmp", lambda vm, t: None, 2.0).limit == 2.0


def test_a_refused_check_is_asked_every_round_a_slow_one_backs_off():
    """A booting guest's sshd refuses (quick): asked again at once, so the banner is
    seen within a round of sshd's start; one that takes the connection and does not
    greet (a timeout) is asked 2, 4 ... s apart."""
    from vmagent.monitor.signals import Check

    async def refused(vm, timeout):
        return False

    async def silent(vm, timeout):
        await asyncio.sleep(timeout)
        return False

    async def body():
        quick = Check("net", refused, 0.05, backoff_max=8.0, adaptive_max=5.0)
        for _ in range(5):
            await quick._run(None, lambda c: None)
        slow = Check("net", silent, 0.05, backoff_max=8.0)
        for _ in range(3):
            await slow._run(None, lambda c: None)
        return quick, slow
    quick, slow = run(body(), timeout=30)
    assert quick.fails == 5 and quick.slow_fails == 0 and quick.not_before == 0.0
    assert slow.fails == slow.slow_fails == 3
    assert slow.not_before - slow.at >= 3.5            # 4 s after the third start
