"""The allocation of this host's VMs through their life: sizing and admission when one
is created or changed, its cgroup (and GPUs) when it starts, the check when a running
one is re-adopted, limits applied at once when they change, the cgroup removed when it
stops or is deleted; and what the ``host`` operation reports.

The VM service, the launcher and the create transaction call it
(docs/architecture.md); it knows a VM only by what it reads of it (:class:`VMLike`), so
it sits below ``vms`` in the layers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from vmagent import rundir
from vmagent.alloc import gpu as gpu_mod
from vmagent.alloc.capacity import Ledger, Offer
from vmagent.alloc.cgroup import Cgroups, Limits
from vmagent.alloc.cgroupfs import open_cgroups
from vmagent.alloc.config import AgentConfig
from vmagent.alloc.sizing import Demand, Rules, demand, overhead_for, resize, size
from vmagent.errors import BadRequest, VMAgentError
from vmagent.spec import Defaults, VMSpec

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/vmagent")
REMOVE_WAIT = 5.0          # a deleted VM's last threads leave its cgroup within this


class VMLike(Protocol):
    """What the allocator reads of a VM (:class:`vmagent.vms.vm.VM`)."""

    name: str
    run_dir: Path
    rec: Any            # .spec (VMSpec), .rt (.state, .gpus)
    machine: Any        # .pid()


def default_parent(state_dir: Path) -> str:
    """``vmagent`` for the standard state dir; another state dir (a second agent on the
    host, a test) gets a parent of its own, so VM names never clash."""
    state_dir = Path(state_dir).resolve()
    if state_dir == DEFAULT_STATE_DIR:
        return "vmagent"
    return "vmagent-" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]


def started_memory(vm: VMLike) -> int | None:
    """The guest RAM the running qemu was started with (its saved argv's ``-m``)."""
    try:
        argv = json.loads((vm.run_dir / rundir.ARGV).read_text())
        value = argv[argv.index("-m") + 1]
        return int(value.rstrip("M")) << 20
    except (OSError, ValueError, IndexError, TypeError):
        return None


class Allocator:
    def __init__(self, cfg: AgentConfig, state_dir: Path, defaults: Defaults,
                 vms: Callable[[], Iterable[VMLike]],
                 cgroups: Cgroups | None = None,
                 sysfs: gpu_mod.Sysfs = gpu_mod.Sysfs(),
                 accel: Callable[[], str] = lambda: "tcg") -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.vms = vms
        self.defaults = defaults
        self.accel = accel
        self.offer = Offer.of(cfg)
        self.ledger = Ledger(cfg.name, self.offer, cfg.served, self.held)
        parent = cfg.cgroup.parent or default_parent(state_dir)
        self.cgroups = cgroups or open_cgroups(cfg.cgroup.mode, cfg.cgroup.root, parent)
        self.cgroups.parent_cores = self.offer.allocatable.cpu
        self.sysfs = sysfs
        if "gpu-dev" in cfg.served and not cfg.gpus:
            log.warning("segment gpu-dev is served but no [[gpu]] is listed: gpu-dev "
                        "requests will be refused")

    # --- sizing and admission -------------------------------------------------------

    @property
    def rules(self) -> Rules:
        """What this host fills in: its defaults, and qemu's overhead (the config's, or
        the measured one for the accelerator in use)."""
        cap, d = self.cfg.capacity, self.defaults
        over = cap.qemu_overhead if cap.qemu_overhead is not None else \
            overhead_for(self.accel())
        return Rules(overhead=over, cpu_guarantee=self.cfg.cpu_guarantee, cpus=d.cpus,
                     memory=d.memory, segment=d.segment)

    def size(self, spec: VMSpec) -> VMSpec:
        return size(spec, self.rules)

    def resize(self, old: VMSpec, fields: dict[str, Any]) -> VMSpec:
        return resize(old, fields, self.rules)

    def demand_of(self, spec: VMSpec) -> Demand:
        """What an existing VM holds (a record from before sizing is sized as it is)."""
        try:
            return demand(self.size(spec))
        except BadRequest:
            return demand(spec)

    def held(self) -> Iterator[tuple[str, Demand]]:
        for vm in self.vms():
            yield vm.name, self.demand_of(vm.rec.spec)

    @contextlib.contextmanager
    def creating(self, name: Any) -> Iterator[None]:
        """Around one create: whatever it reserved is released when it ends (the VM, if
        it was made, holds it from then on)."""
        try:
            yield
        finally:
            if isinstance(name, str):
                self.ledger.release(name)

    def admit(self, spec: VMSpec, dry_run: bool = False) -> None:
        """A new VM's guarantees: reserved from now on (409 with the numbers if they do
        not fit); a dry run only checks."""
        want = demand(spec)
        if dry_run:
            self.ledger.check(spec.name, want, spec.segment)
        else:
            self.ledger.hold(spec.name, want, spec.segment)
        log.info("%s: admitted %s on %s", spec.name, want.to_json(), self.name)

    def reserve(self, key: str, spec: VMSpec, count: int, check: bool = False) -> None:
        """Hold ``count`` times a sized spec's guarantees under ``key`` (not a VM: a warm
        pool's empty places); with ``check``, 409 when they do not fit. Count 0 frees."""
        self.ledger.release(key)
        if count <= 0:
            return
        one = demand(self.size(spec))
        want = Demand(one.cpu * count, one.ram * count, one.gpus * count)
        if check:
            self.ledger.hold(key, want, spec.segment)
        else:
            self.ledger.in_flight[key] = want

    def renamed(self, old: str, vm: VMLike) -> None:
        """A VM got another name: its qemu moves to the cgroup of the new one."""
        try:
            self.ensure(vm, "renamed")
            self.cgroups.remove(old)
        except VMAgentError as e:
            log.error("%s: its cgroup could not be moved: %s", vm.name, e.message)

    def admit_change(self, name: str, new: VMSpec) -> None:
        """push_config: the VM's new guarantees in place of its old ones."""
        self.ledger.check(name, demand(new), None, exclude=name)

    def plan(self, spec: VMSpec) -> dict[str, Any]:
        """What a dry run shows of the allocation."""
        return {"host": self.name, "demand": demand(spec).to_json(),
                "limits": self._limit_doc(Limits.of(spec)),
                "cgroup": self.cgroups.path(spec.name), "enforcement": self.cgroups.kind}

    # --- a VM's run -----------------------------------------------------------------

    def prepare(self, vm: VMLike) -> tuple[list[str], list[str]]:
        """Before qemu starts: its cgroup made with its limits, its GPUs chosen. Returns
        (the argv prefix that starts qemu inside the cgroup, the GPU devices). A qemu
        that is not one of the host's VMs (a template's build) gets neither."""
        if not any(other is vm for other in self.vms()):
            return [], []
        spec = vm.rec.spec
        sized = self.size(spec) if spec.ram_limit is None else spec
        gpus: list[str] = []
        if sized.gpus:
            busy = {a for other in self.vms() if other.name != vm.name
                    and other.machine.pid() is not None for a in (other.rec.rt.gpus or [])}
            gpus = gpu_mod.pick(self.cfg.gpus, busy, sized.gpus, vm.rec.rt.gpus or [],
                                self.sysfs, vm.name, self.name)
        vm.rec.rt.gpus = gpus
        self.cgroups.create(vm.name, Limits.of(sized))
        return self.cgroups.wrap(vm.name), gpu_mod.argv(gpus)

    def started(self, vm: VMLike) -> None:
        """qemu runs: check that it is in its cgroup."""
        self.ensure(vm, "started")

    def ensure(self, vm: VMLike, why: str) -> bool:
        """A running qemu in its cgroup with its limits (moved in if it is not: True)."""
        pid = vm.machine.pid()
        if pid is None or self.cgroups.kind == "none" or not any(
                other is vm for other in self.vms()):
            return False
        limits = self.running_limits(vm)
        if not self.cgroups.exists(vm.name):
            self.cgroups.create(vm.name, limits)
        if self.cgroups.contains(vm.name, pid):
            return False
        log.warning("%s: qemu pid %d (%s) is not in its cgroup %s: moving it in", vm.name,
                    pid, why, self.cgroups.path(vm.name))
        self.cgroups.apply(vm.name, limits)
        self.cgroups.attach(vm.name, pid)
        return True

    def adopted(self, vm: VMLike) -> None:
        """After an agent restart: a running VM's cgroup is checked (made and entered if
        missing, its limits written again); a stopped VM's leftover cgroup goes."""
        try:
            if vm.machine.pid() is not None:
                self.ensure(vm, "re-adopted")
            else:
                self.cgroups.remove(vm.name)
        except VMAgentError as e:
            log.error("%s: its cgroup could not be checked: %s", vm.name, e.message)

    def running_limits(self, vm: VMLike, spec: VMSpec | None = None) -> Limits:
        """The limits of a running VM: its spec's, with room for the RAM it was started
        with (a smaller memory pushed meanwhile takes effect at its next start)."""
        spec = spec or vm.rec.spec
        sized = self.size(spec) if spec.ram_limit is None else spec
        limits = Limits.of(sized)
        running = started_memory(vm)
        if running is not None and running + self.rules.overhead > limits.ram_limit:
            limits = Limits(limits.cpu_guarantee, limits.cpu_limit, limits.ram_guarantee,
                            running + self.rules.overhead)
        return limits

    def apply(self, vm: VMLike, spec: VMSpec) -> dict[str, Any] | None:
        """push_config: a running VM gets the limits of its new ``spec`` at once (the
        answer's ``limits_applied``); a stopped one at its next start. 409 when the
        running qemu uses more than a new ram_limit."""
        if vm.machine.pid() is None or self.cgroups.kind == "none":
            return None
        limits = self.running_limits(vm, spec)
        if not self.cgroups.exists(vm.name):
            self.cgroups.create(vm.name, limits)
        else:
            self.cgroups.apply(vm.name, limits)
        return self._limit_doc(limits)

    def on_state(self, vm: VMLike, old: Any, new: Any) -> None:
        """A registry hook: a VM that stopped (or broke) leaves no cgroup behind."""
        if getattr(new, "value", new) in ("stopped", "broken"):
            try:
                if not self.cgroups.remove(vm.name):
                    log.info("%s: its cgroup is still busy; removed later", vm.name)
            except VMAgentError as e:
                log.warning("%s: %s", vm.name, e.message)

    async def removed(self, name: str) -> None:
        """The VM is deleted (its qemu is gone): its cgroup goes too."""
        deadline = time.monotonic() + REMOVE_WAIT
        while not self.cgroups.remove(name):
            if time.monotonic() > deadline:
                log.warning("%s: its cgroup %s is still busy after %gs; left for the next "
                            "start", name, self.cgroups.path(name), REMOVE_WAIT)
                return
            await asyncio.sleep(0.05)

    def sweep(self) -> None:
        """At start-up: cgroups under the agent's parent of no running VM are removed."""
        running = {vm.name for vm in self.vms() if vm.machine.pid() is not None}
        for name in self.cgroups.names():
            if name not in running:
                try:
                    self.cgroups.remove(name)
                except VMAgentError as e:
                    log.warning("cgroup %s: %s", name, e.message)

    # --- reports --------------------------------------------------------------------

    def _limit_doc(self, limits: Limits) -> dict[str, Any]:
        return {"cpu_guarantee": limits.cpu_guarantee, "cpu_limit": limits.cpu_limit,
                "ram_guarantee": limits.ram_guarantee, "ram_limit": limits.ram_limit}

    def vm_report(self, vm: VMLike) -> dict[str, Any]:
        """A VM's allocation in its status: what it holds, its cgroup and what the
        cgroup says and has counted (while it runs)."""
        spec = vm.rec.spec
        running = vm.machine.pid() is not None
        out: dict[str, Any] = {"demand": self.demand_of(spec).to_json(),
                               "enforcement": self.cgroups.kind,
                               "gpus": list(vm.rec.rt.gpus or []) if running else []}
        if running and self.cgroups.kind != "none":
            out["cgroup"] = self.cgroups.path(vm.name)
            out["cgroup_dirs"] = [str(d) for d in self.cgroups.dirs(vm.name)]
            out["cgroup_values"] = self.cgroups.values(vm.name)
            out["usage"] = self.cgroups.usage(vm.name)
        return out

    def usage_of(self, vm: VMLike) -> dict[str, Any]:
        """qemu's CPU seconds and memory from the VM's cgroup ({}: it has none)."""
        if self.cgroups.kind == "none" or not self.cgroups.exists(vm.name):
            return {}
        try:
            return self.cgroups.usage(vm.name)
        except (OSError, VMAgentError):
            return {}

    def report(self) -> dict[str, Any]:
        """What ``host`` reports of the allocation."""
        devices = []
        holders = {a: vm.name for vm in self.vms() if vm.machine.pid() is not None
                   for a in (vm.rec.rt.gpus or [])}
        for g in self.cfg.gpus:
            devices.append({**gpu_mod.check(g, self.sysfs), "vm": holders.get(g.address)})
        resources = self.ledger.report()
        resources["gpu"]["devices"] = devices
        return {"name": self.name, "segments": list(self.cfg.served),
                "resources": resources,
                "allocation": {"rules": self.rules.to_json(),
                               "enforcement": self.cgroups.describe(),
                               "config": str(self.cfg.path) if self.cfg.path else None,
                               "in_flight": sorted(self.ledger.in_flight)}}


