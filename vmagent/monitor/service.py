"""The monitor: once a second, every VM's signals (:mod:`.signals`), what is wrong with
it (:mod:`.health`) and its restart when its policy says so (:mod:`.healing`).

The loop itself never waits on a guest: the checks run as tasks of their own and the
loop reads their last results. It acts on a VM only under the VM's lock, and skips a VM
an operation holds (its checks go on). What it finds goes through the registry's one
transition function (state file, event); restarts and warnings are events too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from vmagent.alloc.config import MonitorConfig
from vmagent.errors import VMAgentError
from vmagent.monitor.healing import CRASH_LOOP, Healer
from vmagent.monitor.health import examine
from vmagent.monitor.signals import Probe, VMSignals
from vmagent.vms.lifecycle import Lifecycle
from vmagent.vms.registry import VMRegistry
from vmagent.vms.state import State
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)

GONE_WAIT = 1.0     # after its QMP stream ended, how long a qemu is watched exiting


class MonitorService:
    def __init__(self, registry: VMRegistry, lifecycle: Lifecycle,
                 cfg: MonitorConfig = MonitorConfig(),
                 probes: dict[str, Probe] | None = None) -> None:
        self.registry = registry
        self.lifecycle = lifecycle
        self.cfg = cfg
        self.probes = probes
        self.healer = Healer(cfg)
        self.signals: dict[str, VMSignals] = {}
        self.ticks = 0
        self.tick_seconds = 0.0           # the last tick's duration
        self._task: asyncio.Task | None = None
        self._actions: set[asyncio.Task] = set()
        self._wake = asyncio.Event()      # a VM's QMP stream ended: a round now

    def start(self) -> None:
        """Start the loop; VMs found broken while the agent was away (its qemu died,
        the host rebooted) get their policy's restart too."""
        for vm in self.registry:
            if vm.rec.rt.state == State.BROKEN and not (vm.rec.rt.reason or "").startswith(
                    CRASH_LOOP):
                self._found(vm)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._actions] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for sig in self.signals.values():
            sig.stop()
        self.signals.clear()

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the monitor must survive any one VM
                log.exception("monitor tick failed")
            self.tick_seconds = time.monotonic() - t0
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       max(0.0, self.cfg.interval - self.tick_seconds))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    # --- one round ----------------------------------------------------------------------

    async def round(self) -> None:
        """One tick and everything it started (checks, actions) finished: what the tests
        and the benchmark call instead of the 1 Hz loop."""
        await self.tick()
        await self.settle()

    async def settle(self) -> None:
        tasks = [c._task for s in self.signals.values() for c in s.checks if c.busy]
        await asyncio.gather(*tasks, *self._actions, return_exceptions=True)

    async def tick(self) -> None:
        """Start the due checks of every running VM, act on what the last ones found."""
        self.ticks += 1
        now = time.monotonic()
        names = set()
        for vm in self.registry:
            names.add(vm.name)
            state = vm.rec.rt.state
            if state != State.RUNNING:
                self._unwatch(vm.name)
                if self.healer.due(vm, now):
                    self._act(vm, self._restart)
                continue
            sig = self.signals.get(vm.name)
            if sig is None or sig.vm is not vm:
                self._unwatch(vm.name)
                sig = self.signals[vm.name] = VMSignals(vm, self.cfg, self.probes)
                vm.on_qmp_closed = lambda v=vm: self._qmp_closed(v)
            if vm.lock.locked():            # an operation holds it: checks only
                sig.tick()
                continue
            if not vm.machine.alive():
                self._act(vm, self._gone)
                continue
            sig.tick()
            finding = examine(vm, sig, self.cfg, now)
            if finding.broken:
                self._act(vm, lambda v, r=finding.broken: self._broken(v, r))
            elif bool(finding.warning) != bool(vm.warning):
                self._warn(vm, finding.warning)
            else:
                vm.warning = finding.warning    # the same warning, its time updated
        for name in set(self.signals) - names:
            self._unwatch(name)
        for name in [n for n in self.healer.pending() if n not in names]:
            self.healer.forget(name)

    def _qmp_closed(self, vm: VM) -> None:
        """A VM's QMP stream ended: a round as soon as its qemu is gone (the socket
        closes while qemu still exits: a round at once could still find it there)."""
        async def wait_gone() -> None:
            deadline = time.monotonic() + GONE_WAIT
            while vm.machine.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self._wake.set()

        task = asyncio.create_task(wait_gone())
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    def _unwatch(self, name: str) -> None:
        sig = self.signals.pop(name, None)
        if sig is not None:
            sig.stop()
            sig.vm.warning = None

    def _act(self, vm: VM, action) -> None:
        """Run ``action(vm)`` under the VM's lock, as a task (the loop goes on); one at
        a time per VM."""
        if vm.lock.locked():
            return

        async def run() -> None:
            try:
                async with vm.lock:
                    await action(vm)
            except VMAgentError as e:
                log.warning("%s: %s", vm.name, e.message)
            except Exception:  # noqa: BLE001
                log.exception("%s: monitor action failed", vm.name)

        task = asyncio.create_task(run())
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    # --- what it does ---------------------------------------------------------------------

    async def _gone(self, vm: VM) -> None:
        if vm.rec.rt.state != State.RUNNING or vm.machine.alive():
            return
        self._unwatch(vm.name)
        await self.lifecycle.mark_gone(vm)
        self._found(vm)

    async def _broken(self, vm: VM, reason: str) -> None:
        if vm.rec.rt.state != State.RUNNING:
            return
        log.warning("%s: broken: %s", vm.name, reason)
        self._unwatch(vm.name)
        self.registry.transition(vm, State.BROKEN, reason)
        self._found(vm)

    def _found(self, vm: VM) -> None:
        """The monitor found it broken (or stopped by its guest): its policy decides."""
        p = self.healer.found(vm)
        if p.reason:                        # the crash loop: it stays broken, says why
            vm.rec.rt.reason = p.reason
            self.registry.save(vm)
            vm.event_log.append("crash_loop", reason=p.reason)
            log.warning("%s: %s", vm.name, p.reason)

    async def _restart(self, vm: VM) -> None:
        if not self.healer.due(vm, time.monotonic()):
            return                          # meanwhile someone acted on it
        why = vm.rec.rt.reason
        self.healer.restarted(vm)
        vm.event_log.append("restart", policy=vm.rec.spec.restart_policy, reason=why,
                            restarts=vm.rec.rt.restarts)
        self.registry.save(vm)
        await self.lifecycle.restart(vm, why)

    def _warn(self, vm: VM, warning: str | None) -> None:
        was, vm.warning = vm.warning, warning
        if warning:
            log.warning("%s: %s", vm.name, warning)
            vm.event_log.append("warning", warning=warning)
        elif was:
            vm.event_log.append("warning_cleared", warning=was)
