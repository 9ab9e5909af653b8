"""The lifecycle of a VM that exists: start, shutdown, poweroff, reboot, reset,
hard_reset, snapshot(s); and what happens when its qemu is found gone (the monitor) or
found running (re-adoption after an agent restart). Operations marked ``lock`` in the
table run under the VM's lock (the dispatcher takes it)."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from vmagent import rundir
from vmagent.context import RequestContext
from vmagent.errors import BadRequest, VMAgentError
from vmagent.qemu import disks
from vmagent.spec import parse_timeout
from vmagent.vms.launcher import Launcher
from vmagent.vms.registry import VMRegistry
from vmagent.vms.state import ACTIVE, State
from vmagent.vms.status import vm_status
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)

_SNAP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PANICKED = "the guest kernel panicked"
ADOPT_TIMEOUT = 3.0       # a re-adopted qemu greets on QMP within this, or is hung
VANISHED = "qemu exited unexpectedly (see the console log)"


@dataclass(frozen=True)
class Timeouts:
    shutdown: float = 60.0
    reboot: float = 60.0


class Lifecycle:
    def __init__(self, registry: VMRegistry, launcher: Launcher,
                 timeouts: Timeouts = Timeouts()) -> None:
        self.registry = registry
        self.launcher = launcher
        self.timeouts = timeouts

    async def start(self, ctx: RequestContext, name: str) -> dict:
        vm = self.registry.get(name)
        self.registry.need(vm, State.STOPPED, State.BROKEN)
        vm.rec.rt.restart_times = []          # an operator acted: no crash loop now
        await self._relaunch(vm)
        return vm_status(vm, ctx.caller.user)

    async def restart(self, vm: VM, why: str | None = None) -> None:
        """The restart policy's restart (vmagent/monitor/healing.py): a broken VM's
        qemu (still there when it hangs or is paused) killed, and started again."""
        log.info("%s: restarting (%s)", vm.name, why or "its policy")
        await self._relaunch(vm)

    async def _relaunch(self, vm: VM) -> None:
        """Start qemu; a broken VM's qemu that is still there (paused on an I/O error,
        hung) is killed first."""
        await vm.detach()
        if vm.machine.alive():
            await vm.machine.kill_and_wait()
        await self.launcher.launch(vm)

    async def shutdown(self, ctx: RequestContext, name: str, timeout: Any = None) -> dict:
        vm = self.registry.get(name)
        self.registry.need(vm, State.RUNNING)
        wait = parse_timeout(timeout, self.timeouts.shutdown)
        self.registry.transition(vm, State.STOPPING)
        forced = False
        try:
            if not await vm.powerdown(wait):
                forced = True
        except VMAgentError as e:
            log.warning("%s: powerdown failed: %s", name, e)
            forced = True
        if forced:
            await vm.quit()
        await vm.detach()
        self.registry.transition(
            vm, State.STOPPED, f"forced off: the guest did not power down within {wait:g}s"
            if forced else None, started_at=None)
        return vm_status(vm, ctx.caller.user)

    async def poweroff(self, ctx: RequestContext, name: str) -> dict:
        vm = self.registry.get(name)
        self.registry.need(vm, State.RUNNING, State.BROKEN, State.STARTING, State.STOPPING)
        await vm.quit()
        self.registry.transition(vm, State.STOPPED, started_at=None)
        return vm_status(vm, ctx.caller.user)

    async def reboot(self, ctx: RequestContext, name: str, timeout: Any = None) -> dict:
        vm = self.registry.get(name)
        self.registry.need(vm, State.RUNNING)
        method = await vm.reboot(parse_timeout(timeout, self.timeouts.reboot))
        vm.rec.rt.config_pending = False
        self.registry.save(vm)
        return {**vm_status(vm, ctx.caller.user), "method": method}

    async def reset(self, ctx: RequestContext, name: str) -> dict:
        vm = self.registry.get(name)
        self.registry.need(vm, State.RUNNING)
        await vm.reset()
        vm.reset_boot()
        self.registry.save(vm)
        return vm_status(vm, ctx.caller.user)

    async def hard_reset(self, ctx: RequestContext, name: str) -> dict:
        vm = self.registry.get(name)
        self.registry.need(vm, State.RUNNING, State.BROKEN)
        vm.rec.rt.restart_times = []          # an operator acted: no crash loop now
        await self._relaunch(vm)
        return vm_status(vm, ctx.caller.user)

    async def snapshot(self, ctx: RequestContext, name: str, snapshot: Any = None) -> dict:
        vm = self.registry.get(name)
        tag = snapshot or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime())
        if not isinstance(tag, str) or not _SNAP_RE.fullmatch(tag):
            raise BadRequest("snapshot: a name of letters, digits, '.', '_' and '-' "
                             "(at most 64), starting with a letter or digit")
        self.registry.need(vm, State.RUNNING)
        snap = await vm.snapshot(tag)
        return {"snapshot": snap, **vm_status(vm, ctx.caller.user)}

    async def snapshots(self, ctx: RequestContext, name: str) -> dict:
        vm = self.registry.get(name)
        if vm.rec.rt.state == State.RUNNING:
            return {"snapshots": await vm.snapshots()}
        return {"snapshots": [{"name": s["name"], "date": s.get("date-sec"),
                               "vm_state_size": s.get("vm-state-size", 0)}
                              for s in await disks.snapshot_list(vm.run_dir / rundir.DISK)]}

    # --- what the agent finds -----------------------------------------------------------

    async def reconcile(self, vm: VM) -> None:
        """Make the recorded state agree with the process table (after a restart)."""
        if vm.machine.alive():
            try:
                await vm.attach(ADOPT_TIMEOUT)
            except VMAgentError as e:
                log.warning("%s: qemu runs but QMP does not answer: %s", vm.name, e)
            if vm.rec.rt.state != State.RUNNING:
                self.registry.transition(vm, State.RUNNING, "re-adopted")
            log.info("%s: adopted running qemu pid %s", vm.name, vm.machine.pid())
        elif vm.rec.rt.state == State.STARTING and not vm.machine.pidfile.exists():
            # the agent stopped before qemu ran: the start did not happen
            self.registry.transition(vm, State.STOPPED, "the start was interrupted (the "
                                     "agent stopped before qemu ran)", started_at=None)
        elif vm.rec.rt.state in ACTIVE:
            await self.mark_gone(vm)

    async def mark_gone(self, vm: VM) -> None:
        """qemu is gone without the agent asking: the guest powered itself off (stopped)
        or it died (broken, with the reason)."""
        await vm.drain_events()
        await vm.detach()
        rt = vm.rec.rt
        if vm.panicked or rt.reason == PANICKED or vm.kernel_panicked():
            new, reason = State.BROKEN, PANICKED
        elif vm.last_event == "SHUTDOWN" or vm.powered_down() or rt.state == State.STOPPING:
            new, reason = State.STOPPED, None
        else:
            new, reason = State.BROKEN, VANISHED
        log.warning("%s: qemu is gone; now %s", vm.name, new.value)
        self.registry.transition(vm, new, reason, started_at=None)
