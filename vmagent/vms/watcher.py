"""Watching VMs and reporting on them.

The watcher runs once a second. For every VM it checks link_alive (its qemu process is
still this VM's qemu) and, while the VM is running, net_alive (the guest's sshd greets on
the forwarded port; checked every second until it does, then every ``NET_RECHECK``
seconds, because every check is a connection the guest's sshd logs). A qemu that went
away without the agent asking is recorded as stopped (the guest powered off) or broken.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vmagent.identity import hostkeys
from vmagent.vms.store import State

if TYPE_CHECKING:
    from vmagent.manager import Manager
    from vmagent.vms.vm import VM

log = logging.getLogger(__name__)

INTERVAL = 1.0
NET_RECHECK = 10.0


def vm_status(vm: "VM", probe: bool = True) -> dict:
    rec, rt = vm.rec, vm.rec.rt
    running = rt.state == State.RUNNING
    progress = vm.boot_progress() if running else {"kernel": False, "cloud_init": None,
                                                    "console_bytes": vm.console_size()}
    spec = rec.spec.to_dict()
    return {
        "name": rec.name,
        "state": rt.state.value,
        "spec": spec,
        "pid": vm.machine.pid() if running or rt.state == State.STOPPING else None,
        "accel": rt.accel,
        "ssh_host": "127.0.0.1",
        "ssh_port": rt.ssh_port,
        "ssh_user": (rec.spec.admins or ["root"])[0],
        "ssh_ready": running and vm.ssh_ready,
        # public halves of the host keys the agent gave the VM (null: learn them from the
        # console); vmctl pins them
        "ssh_host_keys": hostkeys.public(vm.host_keys) if vm.host_keys else None,
        # what the 1 Hz watcher saw: qemu alive (link) and the guest's sshd greeting (net)
        "link_alive": running and vm.machine.alive(),
        "net_alive": running and vm.ssh_ready,
        "cloud_init": progress["cloud_init"] if running else None,
        "boot": {"started_at": rt.started_at if running else None,
                 "console_bytes": progress["console_bytes"],
                 "kernel": progress["kernel"]},
        "config_pending": rt.config_pending,
        "reason": rt.reason,
        "created": rt.created,
        "run_dir": str(rec.run_dir),
    }


def host_capacity(state_dir: Path) -> dict:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpus": os.cpu_count() or 1, "memory": mem,
            "disk_free": shutil.disk_usage(state_dir).free}


class Watcher:
    def __init__(self, manager: "Manager") -> None:
        self.manager = manager
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the watcher must survive any one VM
                log.exception("watcher tick failed")
            await asyncio.sleep(INTERVAL)

    async def tick(self) -> None:
        checks = []
        now = time.monotonic()
        for vm in list(self.manager.vms.values()):
            if vm.rec.rt.state != State.RUNNING or vm.lock.locked():
                continue
            if not vm.machine.alive():                       # link_alive
                async with vm.lock:
                    if vm.rec.rt.state == State.RUNNING and not vm.machine.alive():
                        await self.manager._mark_gone(vm)
                continue
            wait = NET_RECHECK if vm.ssh_ready else INTERVAL
            if now - vm.ssh_checked >= wait:                 # net_alive
                checks.append(vm.check_ssh())
        if checks:
            await asyncio.gather(*checks)
