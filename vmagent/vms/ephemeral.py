"""Ephemeral VMs and TTLs: a VM whose spec says ``ephemeral`` is deleted, disk included,
as soon as it powers off; a VM with a ``ttl`` is deleted once that many seconds have
passed since its creation.

Three ways lead here, one rule decides (:func:`due`):

- a state hook (:meth:`Ephemeral.on_state`, on the registry): an ephemeral VM that
  became stopped or broken (the watcher noticed its qemu gone after a guest
  ``poweroff``, or somebody powered it off) is deleted at once;
- the agent's start (:meth:`Ephemeral.sweep`, after re-adoption): one that powered off
  while the agent was down, or whose TTL passed meanwhile;
- a check every few seconds (:meth:`Ephemeral.start`): the TTLs.

The delete is the ``delete`` operation's own removal, under the VM's lock (so it waits
for an operation in progress). A VM still being created is never touched: its create
rolls itself back.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from typing import Awaitable, Callable

from vmagent.vms.registry import VMRegistry
from vmagent.vms.state import State
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)

INTERVAL = 5.0          # how often the TTLs are checked
OFF = (State.STOPPED, State.BROKEN)


def created_epoch(created: str) -> float | None:
    """Epoch seconds of a record's ``created`` (``2026-12-02T05:14:09Z``)."""
    try:
        return float(calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def expires_at(vm: VM) -> float | None:
    """When the VM's TTL runs out (epoch seconds), None without one."""
    ttl = vm.rec.spec.ttl
    start = created_epoch(vm.rec.rt.created)
    return None if ttl is None or start is None else start + ttl


def due(vm: VM, now: float) -> str | None:
    """Why the VM is to be deleted now (None: it is not)."""
    rt, spec = vm.rec.rt, vm.rec.spec
    if rt.creating or rt.state == State.DELETING:
        return None
    if spec.ephemeral and rt.state in OFF:
        return f"ephemeral and {rt.state.value}"
    end = expires_at(vm)
    if end is not None and now >= end:
        return f"its TTL of {spec.ttl}s passed"
    return None


class Ephemeral:
    def __init__(self, registry: VMRegistry, remove: Callable[[VM], Awaitable[None]],
                 interval: float = INTERVAL) -> None:
        self.registry = registry
        self.remove = remove
        self.interval = interval
        self._pending: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None

    # --- the three ways in -----------------------------------------------------------

    def on_state(self, vm: VM, old: State, new: State) -> None:
        """Registry hook: an ephemeral VM that powered off goes at once."""
        if new in OFF and due(vm, time.time()) is not None:
            self._schedule(vm.name)

    async def sweep(self) -> list[str]:
        """Delete every VM that is due now (at the agent's start); the names deleted."""
        names = [vm.name for vm in self.registry if due(vm, time.time())]
        for name in names:
            self._schedule(name)
        await self.settle()
        return [n for n in names if n not in self.registry]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._pending.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def settle(self) -> None:
        """Wait for the deletions under way (tests, the start-up sweep)."""
        while self._pending:
            await asyncio.gather(*list(self._pending.values()), return_exceptions=True)

    # --- the work --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.time()
            for vm in self.registry:
                if due(vm, now) is not None:
                    self._schedule(vm.name)

    def _schedule(self, name: str) -> None:
        if name in self._pending:
            return
        task = asyncio.get_running_loop().create_task(self._reap(name))
        self._pending[name] = task
        task.add_done_callback(lambda _t: self._pending.pop(name, None))

    async def _reap(self, name: str) -> None:
        try:
            async with self.registry.locked(name):
                vm = self.registry.find(name)
                why = due(vm, time.time()) if vm is not None else None
                if vm is None or why is None:      # deleted, or started again meanwhile
                    return
                log.warning("%s: deleting it: %s", name, why)
                vm.event_log.append("deleted", reason=why)
                await self.remove(vm)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the next check tries again
            log.exception("%s: deleting it failed", name)
