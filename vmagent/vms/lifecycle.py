"""The lifecycle operations of a VM that exists: start, shutdown, poweroff, reboot,
reset, hard_reset, snapshot(s). A mixin of :class:`vmagent.manager.Manager` (the server
calls ``op_<name>`` under the VM's lock)."""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from vmagent.qemu import argv as qargv
from vmagent.qemu import disks
from vmagent.errors import BadRequest, Conflict, VMAgentError
from vmagent.spec import parse_timeout as _timeout
from vmagent.vms.store import State
from vmagent.vms.vm import VM
from vmagent.vms.watcher import vm_status

if TYPE_CHECKING:
    from vmagent.manager import Manager

log = logging.getLogger(__name__)

_SNAP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class LifecycleOps:
    def _need(self: "Manager", vm: VM, *states: State) -> None:
        if vm.rec.rt.state not in states:
            want = " or ".join(s.value for s in states)
            raise Conflict(f"VM {vm.name} is {vm.rec.rt.state.value}; this needs it {want}",
                           state=vm.rec.rt.state.value)

    async def op_start(self: "Manager", name: str) -> dict:
        vm = self.get(name)
        self._need(vm, State.STOPPED, State.BROKEN)
        await self._launch(vm)
        return vm_status(vm)

    async def op_shutdown(self: "Manager", name: str, timeout: Any = None) -> dict:
        vm = self.get(name)
        self._need(vm, State.RUNNING)
        wait = _timeout(timeout, self.settings.shutdown_timeout)
        vm.rec.rt.state = State.STOPPING
        self.store.save_state(vm.rec)
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
        rt = vm.rec.rt
        rt.state, rt.started_at = State.STOPPED, None
        rt.reason = (f"forced off: the guest did not power down within {wait:g}s"
                     if forced else None)
        self.store.save_state(vm.rec)
        return vm_status(vm)

    async def op_poweroff(self: "Manager", name: str) -> dict:
        vm = self.get(name)
        self._need(vm, State.RUNNING, State.BROKEN, State.STARTING, State.STOPPING)
        await vm.quit()
        vm.rec.rt.state, vm.rec.rt.started_at, vm.rec.rt.reason = State.STOPPED, None, None
        self.store.save_state(vm.rec)
        return vm_status(vm)

    async def op_reboot(self: "Manager", name: str, timeout: Any = None) -> dict:
        vm = self.get(name)
        self._need(vm, State.RUNNING)
        method = await vm.reboot(_timeout(timeout, self.settings.reboot_timeout))
        vm.rec.rt.config_pending = False
        self.store.save_state(vm.rec)
        return {**vm_status(vm), "method": method}

    async def op_reset(self: "Manager", name: str) -> dict:
        vm = self.get(name)
        self._need(vm, State.RUNNING)
        await vm.reset()
        vm.reset_boot()
        self.store.save_state(vm.rec)
        return vm_status(vm)

    async def op_hard_reset(self: "Manager", name: str) -> dict:
        vm = self.get(name)
        self._need(vm, State.RUNNING, State.BROKEN, State.STARTING)
        await vm.detach()
        if vm.machine.alive():
            await vm.machine.kill_and_wait()
        await self._launch(vm)
        return vm_status(vm)

    async def op_snapshot(self: "Manager", name: str, snapshot: Any = None) -> dict:
        vm = self.get(name)
        tag = snapshot or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime())
        if not isinstance(tag, str) or not _SNAP_RE.fullmatch(tag):
            raise BadRequest("snapshot: a name of letters, digits, '.', '_' and '-' "
                             "(at most 64), starting with a letter or digit")
        self._need(vm, State.RUNNING)
        snap = await vm.snapshot(tag)
        return {"snapshot": snap, **vm_status(vm)}

    async def op_snapshots(self: "Manager", name: str) -> dict:
        vm = self.get(name)
        if vm.rec.rt.state == State.RUNNING:
            return {"snapshots": await vm.snapshots()}
        return {"snapshots": [{"name": s["name"], "date": s.get("date-sec"),
                               "vm_state_size": s.get("vm-state-size", 0)}
                              for s in await disks.snapshot_list(vm.run_dir / qargv.DISK)]}
