"""The VMs of this agent: lookup by name, one operation lock per VM (or per name while it
is being created), the one function every state change goes through, and loading the
records at start-up (:mod:`vmagent.vms.lifecycle` reconciles them with the processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable, Iterator

from vmagent.errors import Conflict, NotFound, VMAgentError
from vmagent.spec import check_name
from vmagent.vms.state import State, check_transition
from vmagent.vms.store import Store, VMRecord
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)

# called after every state change: (vm, old state, new state)
StateHook = Callable[[VM, State, State], None]


class VMRegistry:
    def __init__(self, store: Store, lock_wait: float = 600.0) -> None:
        self.store = store
        self.lock_wait = lock_wait
        self._vms: dict[str, VM] = {}
        self._name_locks: dict[str, asyncio.Lock] = {}
        self.hooks: list[StateHook] = []

    # --- lookup -----------------------------------------------------------------------

    def get(self, name: str) -> VM:
        check_name(name)
        vm = self._vms.get(name)
        if vm is None:
            raise NotFound(f"no VM named {name!r}", vm=name)
        return vm

    def find(self, name: str) -> VM | None:
        return self._vms.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._vms

    def __iter__(self) -> Iterator[VM]:
        return iter([self._vms[n] for n in sorted(self._vms)])

    def __len__(self) -> int:
        return len(self._vms)

    def names(self) -> list[str]:
        return sorted(self._vms)

    # --- membership ---------------------------------------------------------------------

    def add(self, rec: VMRecord) -> VM:
        """Register a VM (its lock is the one its name was locked with while created)."""
        vm = self._vms[rec.name] = VM(rec)
        vm.lock = self._name_locks.pop(rec.name, vm.lock)
        return vm

    def rename(self, vm: VM, new: str) -> None:
        """Give a VM another name (its run dir moves; a running qemu keeps running and
        is still recognised as the VM's: ``launched_in``). The caller holds its lock."""
        check_name(new)
        if new in self._vms:
            raise Conflict(f"a VM named {new!r} already exists", vm=new)
        old, old_dir = vm.name, vm.run_dir
        if vm.machine.launched_in is None and vm.machine.alive():
            vm.machine.launched_in = old_dir.resolve()
            vm.rec.rt.launched_in = str(vm.machine.launched_in)
        try:
            self.store.rename(vm.rec, new)
        except FileExistsError:
            raise Conflict(f"a VM named {new!r} already exists", vm=new) from None
        vm.rec.spec.name = new
        vm.machine.run_dir = vm.run_dir
        self._vms.pop(old, None)
        self._vms[new] = vm
        self._name_locks.pop(new, None)     # the VM's own lock guards the name now
        self.store.save(vm.rec)
        vm.event_log.append("renamed", **{"from": old, "to": new})
        log.info("%s: renamed %s", old, new)

    def discard(self, name: str) -> None:
        self._vms.pop(name, None)

    def load(self) -> list[VM]:
        """Register every VM of the store (records that cannot be read are logged)."""
        loaded = []
        for name in self.store.names():
            try:
                rec = self.store.load(name)
            except VMAgentError as e:
                log.error("%s", e)
                continue
            loaded.append(self.add(rec))
        return loaded

    # --- locking ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[None]:
        """The VM's operation lock (or the name's, while the VM is being created)."""
        check_name(name)
        vm = self._vms.get(name)
        lock = vm.lock if vm is not None else self._name_locks.setdefault(name, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), self.lock_wait)
        except asyncio.TimeoutError:
            raise Conflict(f"VM {name} is busy with another operation; gave up after "
                           f"{self.lock_wait:g}s") from None
        try:
            yield
        finally:
            lock.release()

    # --- state ----------------------------------------------------------------------------

    def transition(self, vm: VM, new: State, reason: str | None = None,
                   **runtime: object) -> None:
        """Change the VM's state (checked against the declared transitions), set
        ``runtime`` fields with it, write the state file and log the event."""
        rt = vm.rec.rt
        old = rt.state
        check_transition(vm.name, old, new)
        for key, value in runtime.items():
            if not hasattr(rt, key):
                raise AttributeError(f"Runtime has no field {key!r}")
            setattr(rt, key, value)
        rt.state, rt.reason, rt.changed_at = new, reason, time.time()
        self.store.save_state(vm.rec)
        vm.event_log.append("state", **{"from": old.value, "to": new.value},
                            reason=reason)
        log.info("%s: %s -> %s%s", vm.name, old.value, new.value,
                 f" ({reason})" if reason else "")
        for hook in self.hooks:
            hook(vm, old, new)

    def save(self, vm: VM) -> None:
        """Write the VM's runtime record (no state change)."""
        self.store.save_state(vm.rec)

    def need(self, vm: VM, *states: State) -> None:
        """Refuse (409) unless the VM is in one of ``states``."""
        if vm.rec.rt.state not in states:
            want = " or ".join(s.value for s in states)
            raise Conflict(f"VM {vm.name} is {vm.rec.rt.state.value}; this needs it {want}",
                           state=vm.rec.rt.state.value)
