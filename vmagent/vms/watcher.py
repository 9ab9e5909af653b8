"""Watching the running VMs once a second.

For every running VM the watcher checks that its qemu process is still this VM's qemu
(link) and, while it runs, that the guest's sshd greets on the forwarded port (net;
checked every second until it does, then every ``NET_RECHECK`` seconds, because every
check is a connection the guest's sshd logs). A qemu that went away without the agent
asking is handed to :meth:`Lifecycle.mark_gone` (stopped or broken).
"""

from __future__ import annotations

import asyncio
import logging
import time

from vmagent.vms.lifecycle import Lifecycle
from vmagent.vms.registry import VMRegistry
from vmagent.vms.state import State

log = logging.getLogger(__name__)

INTERVAL = 1.0
NET_RECHECK = 10.0


class Watcher:
    def __init__(self, registry: VMRegistry, lifecycle: Lifecycle) -> None:
        self.registry = registry
        self.lifecycle = lifecycle
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
        for vm in self.registry:
            if vm.rec.rt.state != State.RUNNING or vm.lock.locked():
                continue
            if not vm.machine.alive():                       # link
                async with vm.lock:
                    if vm.rec.rt.state == State.RUNNING and not vm.machine.alive():
                        await self.lifecycle.mark_gone(vm)
                continue
            wait = NET_RECHECK if vm.ssh_ready else INTERVAL
            if now - vm.ssh_checked >= wait:                 # net
                checks.append(vm.check_ssh())
        if checks:
            await asyncio.gather(*checks)
