"""What the agent exports (docs/monitoring.md): per VM (labels ``vm``, ``owner``,
``segment``) its signals, state, uptime, qemu's CPU and memory, disk, restarts; per host
the VMs by state, capacity and allocation, versions, accelerator, operations by name and
result with latency histograms, jobs, and the monitor's own round.

:class:`Sampler` reads them into :mod:`.model` metrics at each scrape;
:class:`AgentCollector` is the prometheus-client ``Collector`` over them, registered in
a ``CollectorRegistry`` of its own, and :func:`exposition` the text format
(``generate_latest``; nothing here writes the format by hand).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import Collector

from vmagent import __version__, rundir
from vmagent.monitor.model import Histogram, Metric
from vmagent.vms.state import State
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
VM_LABELS = ("vm", "owner", "segment")


class Usage(Protocol):
    """qemu's CPU seconds and memory of a VM (``{"cpu_seconds", "memory"}``), from its
    cgroup where it has one (:class:`vmagent.alloc.service.Allocator`)."""

    def __call__(self, vm: VM) -> dict[str, Any]: ...


def process_usage(vm: VM) -> dict[str, Any]:
    """qemu's CPU seconds and resident memory, from the process (psutil)."""
    import psutil
    pid = vm.machine.pid()
    if pid is None:
        return {}
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            return {"cpu_seconds": t.user + t.system, "memory": p.memory_info().rss}
    except psutil.Error:
        return {}


def disk_allocated(vm: VM) -> int:
    """Bytes the VM's disk holds on the host (its overlay's allocated blocks)."""
    try:
        return os.stat(vm.run_dir / rundir.DISK).st_blocks * 512
    except OSError:
        return 0


class Sampler:
    """The metrics now. Every source is given by the wiring (vmagent/app.py)."""

    def __init__(self, vms: Callable[[], Iterable[VM]], *,
                 host: Callable[[], dict[str, Any]],
                 usage: Usage | None = None,
                 ops: Callable[[], dict[tuple[str, str], Histogram]] = dict,
                 jobs: Callable[[], Iterable[tuple[str, str]]] = list,
                 monitor: Callable[[], dict[str, float]] = dict) -> None:
        self.vms = vms
        self.host = host
        self.usage = usage
        self.ops = ops
        self.jobs = jobs
        self.monitor = monitor

    def _usage(self, vm: VM) -> dict[str, Any]:
        got = self.usage(vm) if self.usage is not None else {}
        if "cpu_seconds" not in got or "memory" not in got:
            got = {**process_usage(vm), **got}
        return got

    def sample(self) -> list[Metric]:
        now = time.time()
        g = lambda n, h, *extra: Metric(n, "gauge", h, (*VM_LABELS, *extra))  # noqa: E731
        link = g("link_alive", "1 if the guest answered a guest-agent ping within its "
                 "timeout at the last check (running VMs)")
        net = g("net_alive", "1 if the guest's sshd sent its banner within its timeout at "
                "the last check (running VMs)")
        state = g("vmagent_vm_state", "1 for the VM's current state", "state")
        broken = g("vmagent_vm_broken", "1 if the VM is broken")
        warning = g("vmagent_vm_warning", "1 if the monitor warns about the VM (its link "
                    "down too long while qemu runs)")
        uptime = g("vmagent_vm_uptime_seconds", "Seconds since qemu started (running VMs)")
        cpu = Metric("vmagent_vm_cpu_seconds", "counter", "qemu's CPU time (its cgroup, "
                     "else the process)", VM_LABELS)
        rss = g("vmagent_vm_memory_bytes", "qemu's memory (its cgroup's, else the "
                "process' resident set)")
        disk = g("vmagent_vm_disk_allocated_bytes", "Bytes the VM's disk overlay holds on "
                 "the host")
        restarts = Metric("vmagent_vm_restarts", "counter", "Restarts by the VM's restart "
                          "policy", VM_LABELS)
        age = g("vmagent_vm_state_age_seconds", "Seconds since the VM's last state change")
        by_state = {s.value: 0 for s in State}
        for vm in self.vms():
            rt = vm.rec.rt
            lv = (vm.name, rt.owner or "", vm.rec.spec.segment or "")
            running = rt.state == State.RUNNING
            by_state[rt.state.value] += 1
            link.add(int(running and vm.link_alive), *lv)
            net.add(int(running and vm.net_alive), *lv)
            state.add(1, *lv, rt.state.value)
            broken.add(int(rt.state == State.BROKEN), *lv)
            warning.add(int(running and vm.warning is not None), *lv)
            uptime.add(max(0.0, now - rt.started_at) if running and rt.started_at else 0,
                       *lv)
            restarts.add(rt.restarts, *lv)
            age.add(max(0.0, now - rt.changed_at) if rt.changed_at else 0, *lv)
            disk.add(disk_allocated(vm), *lv)
            if rt.state in (State.RUNNING, State.STOPPING, State.BROKEN):
                u = self._usage(vm)
                if "cpu_seconds" in u:
                    cpu.add(u["cpu_seconds"], *lv)
                if "memory" in u:
                    rss.add(u["memory"], *lv)
        vms = Metric("vmagent_vms", "gauge", "VMs on this host by state", ("state",))
        for s, n in by_state.items():
            vms.add(n, s)
        return [link, net, state, broken, warning, uptime, cpu, rss, disk, restarts, age,
                vms, *self._host(), self._ops(), self._jobs(), *self._monitor()]

    def _host(self) -> list[Metric]:
        h = self.host()
        info = Metric("vmagent_agent_info", "gauge", "1, with the agent's version, qemu's "
                      "version and the accelerator as labels (a rollout shows here)",
                      ("host", "version", "qemu_version", "accel"))
        info.add(1, h.get("name") or "", __version__, h.get("qemu_version") or "",
                 (h.get("accel") or {}).get("name") or "")
        res = Metric("vmagent_host_resource", "gauge", "Per resource (cpu cores, memory "
                     "bytes, gpu devices): total, allocatable, guaranteed, free",
                     ("resource", "kind"))
        for resource, doc in sorted((h.get("resources") or {}).items()):
            for kind, value in sorted(doc.items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    res.add(value, resource, kind)
        cap = Metric("vmagent_host_capacity", "gauge", "The host: cpus, memory bytes, free "
                     "bytes of the state dir's file system", ("resource",))
        for key, value in sorted((h.get("capacity") or {}).items()):
            cap.add(value, key)
        alloc = Metric("vmagent_host_allocated", "gauge", "vCPUs and guest memory bytes "
                       "of the running VMs", ("resource",))
        for key, value in sorted((h.get("allocated") or {}).items()):
            alloc.add(value, key)
        return [info, res, cap, alloc]

    def _ops(self) -> Metric:
        m = Metric("vmagent_operation_duration_seconds", "histogram", "Operations by name "
                   "and result (ok or the error's code), with their latency",
                   ("op", "result"))
        for (op, result), hist in sorted(self.ops().items()):
            m.add(hist, op, result)
        return m

    def _jobs(self) -> Metric:
        m = Metric("vmagent_jobs", "gauge", "Jobs the agent knows (image builds and pulls, "
                   "template builds) by kind and state", ("kind", "state"))
        counts: dict[tuple[str, str], int] = {}
        for kind, state in self.jobs():
            counts[(kind, state)] = counts.get((kind, state), 0) + 1
        for (kind, state), n in sorted(counts.items()):
            m.add(n, kind, state)
        return m

    def _monitor(self) -> list[Metric]:
        mon = self.monitor()
        out = []
        for key, help_ in (("watched", "Running VMs the monitor checks"),
                           ("tick_seconds", "How long the monitor's last round took"),
                           ("pending_restarts", "Restarts due by the VMs' policies")):
            m = Metric(f"vmagent_monitor_{key}", "gauge", help_)
            m.add(mon.get(key, 0))
            out.append(m)
        return out


class AgentCollector(Collector):
    """A prometheus-client collector over :class:`Sampler` (read at each scrape)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def collect(self) -> Iterator[Any]:
        for m in self.sampler.sample():
            yield from _families(m)


def _families(m: Metric) -> Iterator[Any]:
    labels = list(m.labels)
    if m.kind == "gauge":
        fam: Any = GaugeMetricFamily(m.name, m.help, labels=labels)
        for lv, value in m.samples:
            fam.add_metric(list(lv), value)
    elif m.kind == "counter":
        fam = CounterMetricFamily(m.name, m.help, labels=labels)
        for lv, value in m.samples:
            fam.add_metric(list(lv), value)
    elif m.kind == "histogram":
        fam = HistogramMetricFamily(m.name, m.help, labels=labels)
        for lv, hist in m.samples:
            assert isinstance(hist, Histogram)
            fam.add_metric(list(lv), hist.cumulative(), hist.sum)
    else:
        raise ValueError(f"{m.name}: unknown kind {m.kind!r}")
    yield fam


def registry_of(sampler: Sampler) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(sampler))
    return reg


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()
