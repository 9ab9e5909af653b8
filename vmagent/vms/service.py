"""The VM operations that are not its lifecycle: list, status, console_log, create,
delete, push_config; and re-adoption of the VMs at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from vmagent import faults, rundir
from vmagent.context import RequestContext
from vmagent.errors import BadRequest, Forbidden, VMAgentError
from vmagent.identity import accounts as accounts_mod
from vmagent.identity import hostkeys, seed
from vmagent.identity.accounts import Account
from vmagent.images.store import ImageStore
from vmagent.qemu import argv as qargv
from vmagent.qemu.guest import guest_exec
from vmagent.spec import (USER_RE, Defaults, VMSpec, apply_defaults, parse_flag,
                          parse_offset_tail)
from vmagent.vms.create import Creator
from vmagent.vms.lifecycle import Lifecycle
from vmagent.vms.registry import VMRegistry
from vmagent.vms.state import State
from vmagent.vms.status import vm_status
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)


class WarmCreate(Protocol):
    """Creates a VM from a template's saved state (:mod:`vmagent.templates.warm`)."""

    async def create(self, ctx: RequestContext, template: Any, fields: dict[str, Any],
                     dry_run: bool, start: bool) -> dict: ...


class PoolTake(Protocol):
    """Takes a VM from a warm pool (:mod:`vmagent.pools.service`)."""

    async def take(self, ctx: RequestContext, pool: Any, fields: dict[str, Any],
                   dry_run: bool) -> dict: ...


class VMService:
    def __init__(self, registry: VMRegistry, creator: Creator, lifecycle: Lifecycle,
                 images: ImageStore, defaults: Defaults,
                 warm: WarmCreate | None = None) -> None:
        self.registry = registry
        self.creator = creator
        self.lifecycle = lifecycle
        self.images = images
        self.defaults = defaults
        self.warm = warm
        self.pools: PoolTake | None = None      # the warm pools, when the agent has them

    # --- start-up -----------------------------------------------------------------------

    async def adopt(self) -> None:
        """Load every VM and make it agree with what runs: a create that never answered
        is rolled back, a delete that was interrupted is finished, the others are
        reconciled with their qemu."""
        alloc = self.creator.alloc

        async def one(vm: VM) -> None:
            rt = vm.rec.rt
            try:
                if rt.creating or rt.state == State.DELETING:
                    what = "create" if rt.creating else "delete"
                    log.warning("%s: finishing an interrupted %s: removing it", vm.name,
                                what)
                    await self._remove(vm)
                else:
                    await self.lifecycle.reconcile(vm)
                    if alloc is not None:   # a running qemu: in its cgroup, its limits
                        alloc.adopted(vm)
            except Exception:  # noqa: BLE001 - one VM must not keep the agent from starting
                log.exception("%s: adopting it failed", vm.name)
        # all at once: a hung qemu costs its own QMP timeout, not everybody's
        await asyncio.gather(*(one(vm) for vm in self.registry.load()))
        if alloc is not None:
            alloc.sweep()

    # --- reading ------------------------------------------------------------------------

    async def list(self, ctx: RequestContext, all: Any = False) -> dict:
        """The VMs the caller may operate: their own and those they administer; an
        operator's list has the VMs without an owner too (made before ownership
        existed), and with ``all`` every VM."""
        caller = ctx.caller
        every = parse_flag(all, "all")
        if every and not caller.is_operator:
            raise Forbidden(f"all: only operators list every VM; {caller.user} is a "
                            f"{caller.role.value}", user=caller.user)

        def listed(vm: VM) -> bool:
            owner, admins = vm.people()
            return every or caller.user == owner or caller.user in admins or (
                caller.is_operator and owner is None)
        return {"vms": [vm_status(vm, caller.user) for vm in self.registry if listed(vm)]}

    async def status(self, ctx: RequestContext, name: str) -> dict:
        vm = self.registry.get(name)
        status = vm_status(vm, ctx.caller.user)
        if self.creator.alloc is not None:
            status["allocation"] = self.creator.alloc.vm_report(vm)
        return status

    async def console_log(self, ctx: RequestContext, name: str, offset: Any = 0,
                          tail: Any = None) -> dict:
        vm = self.registry.get(name)
        log_ = vm.console
        size = log_.size()
        offset, tail = parse_offset_tail(offset, tail)
        if tail is not None:
            offset = max(0, size - tail)
        offset = min(offset, size)
        data = log_.read(offset)
        return {"offset": offset + len(data), "size": size,
                "data": data.decode("utf-8", "replace")}

    # --- create / delete / config -------------------------------------------------------

    async def create(self, ctx: RequestContext, dry_run: Any = False, start: Any = True,
                     template: Any = None, pool: Any = None, **fields: Any) -> dict:
        dry_run, start = parse_flag(dry_run, "dry_run"), parse_flag(start, "start")
        if pool not in (None, ""):
            if template not in (None, ""):
                raise BadRequest("pool and template: give one (a pool's VMs are clones of "
                                 "its template)")
            if self.pools is None:
                raise BadRequest("pool: warm pools are not available on this agent")
            if not start:
                raise BadRequest("start: a VM taken from a pool is running")
            return await self.pools.take(ctx, pool, fields, dry_run)
        if template not in (None, ""):
            if self.warm is None:
                raise BadRequest("template: warm starts are not available on this agent")
            with self._creating(fields):
                return await self.warm.create(ctx, template, fields, dry_run, start)
        with self._creating(fields):
            vm, dry = await self.creator.cold(ctx, fields, dry_run, start)
        if vm is None:
            assert dry is not None
            return dry
        self.creator.done(vm)
        return vm_status(vm, ctx.caller.user)

    def _creating(self, fields: dict[str, Any]) -> contextlib.AbstractContextManager:
        """What a create reserves on the host is released when it ends (its VM holds
        it from then on)."""
        alloc = self.creator.alloc
        return alloc.creating(fields.get("name")) if alloc else contextlib.nullcontext()

    async def delete(self, ctx: RequestContext, name: str) -> dict:
        vm = self.registry.get(name)
        await self._remove(vm)
        return {"deleted": name}

    async def remove(self, vm: VM) -> None:
        """Delete a VM the agent itself decided to delete (vms/ephemeral.py); the caller
        holds its lock."""
        await self._remove(vm)

    async def _remove(self, vm: VM) -> None:
        """Stop the VM and remove its run dir. Works on a full file system: the state
        file may not be writable then, and removing frees the space."""
        if vm.rec.rt.state != State.DELETING:
            try:
                self.registry.transition(vm, State.DELETING)
            except OSError as e:
                log.warning("%s: cannot record the delete (%s); removing it anyway",
                            vm.name, e)
        faults.point("delete.marked")
        if vm.machine.alive():
            await vm.quit()
        await vm.detach()
        faults.point("delete.stopped")
        self.registry.store.remove(vm.name)
        self.registry.discard(vm.name)
        if self.creator.alloc is not None:
            await self.creator.alloc.removed(vm.name)

    async def push_config(self, ctx: RequestContext, name: str, owner: Any = None,
                          **fields: Any) -> dict:
        vm = self.registry.get(name)
        old = vm.rec.spec
        if owner is not None:
            if not ctx.caller.is_operator:
                raise Forbidden(f"owner: only operators give a VM another owner; "
                                f"{ctx.caller.user} is a {ctx.caller.role.value}",
                                vm=name, user=ctx.caller.user)
            if not isinstance(owner, str) or not USER_RE.fullmatch(owner):
                raise BadRequest(f"owner: {str(owner)[:40]!r} is not a valid user name")
        if "name" in fields and fields["name"] != name:
            raise BadRequest("a VM cannot be renamed")
        alloc = self.creator.alloc
        spec = (alloc.resize(old, fields) if alloc is not None
                else VMSpec.from_dict({**old.to_dict(), **fields}))
        if spec.image != old.image:
            raise BadRequest(f"the image of {name} cannot change ({old.image} -> "
                             f"{spec.image}); create a new VM")
        image = self.images.resolve(spec.image)
        spec = apply_defaults(spec, self.defaults, image.virtual_size)
        if spec.disk < old.disk:
            raise BadRequest(f"disk: {spec.disk} bytes is smaller than the current "
                             f"{old.disk}; a disk can only grow")
        applied = None
        if alloc is not None:
            alloc.admit_change(name, spec)   # larger guarantees must fit (409 otherwise)
            applied = alloc.apply(vm, spec)  # a running VM's limits change at once
        rt = vm.rec.rt
        old_accounts = vm.accounts
        if rt.accounts is None and owner is None:    # a VM from before people existed
            accounts = accounts_mod.from_spec(spec)
        else:
            accounts = await self.creator.accounts(owner or rt.owner or ctx.caller.user,
                                                   spec, previous=old_accounts)
        instance_id = seed.new_instance_id(name)
        # the VM keeps its host keys, unless the new user-data handles them itself
        keys = hostkeys.load(vm.run_dir)
        if keys and hostkeys.overridden(image.cloud_config, spec.extra_cloud_config()):
            keys = None
        files = seed.render_seed(spec, instance_id, rt.mac, image.cloud_config, keys,
                                 accounts)
        # a new inode: a running qemu keeps reading the old seed until the swap below
        seed.write_seed_iso(vm.run_dir / rundir.SEED, files)
        if keys is None:
            (vm.run_dir / rundir.HOST_KEYS).unlink(missing_ok=True)
            vm.host_keys = None
        vm.rec.spec, rt.instance_id = spec, instance_id
        if owner is not None:
            rt.owner = owner
        if rt.accounts is not None or owner is not None:
            rt.accounts = [a.to_json() for a in accounts]
        self.registry.store.save_spec(vm.rec)
        synced = None
        if rt.state == State.RUNNING:
            rt.config_pending = True
            synced = await self._sync_accounts(vm, old_accounts, accounts)
            # the guest locks the tray of a mounted CD: force the swap, so that a guest
            # reboot (not only a cold start) sees the new seed
            try:
                await vm.qmp("blockdev-change-medium", {
                    "id": qargv.SEED_DEVICE, "filename": str(vm.run_dir / rundir.SEED),
                    "format": "raw", "read-only-mode": "read-only", "force": True})
            except VMAgentError as e:
                log.warning("%s: seed swap failed (%s); the new config is used at the "
                            "next start", name, e)
        self.registry.save(vm)
        status = vm_status(vm, ctx.caller.user)
        if applied is not None:
            status["limits_applied"] = applied
        return {**status, "accounts_synced": synced} if synced is not None else status

    async def _sync_accounts(self, vm: VM, old: list[Account],
                             new: list[Account]) -> dict | None:
        """Give added people their account and keys in the running guest, take removed
        ones away (through the guest agent, no reboot). None: nothing changed."""
        upsert, remove = accounts_mod.changes(old, new)
        if not upsert and not remove:
            return None
        result = {"added": [a.name for a in upsert], "removed": remove, "ok": False}
        try:
            code, out = await guest_exec(vm.agent, "/bin/sh",
                                         ["-c", accounts_mod.sync_script(upsert, remove)],
                                         timeout=60, agent_wait=5)
        except VMAgentError as e:
            result["error"] = f"the guest agent did not answer: {e.message}; the " \
                "accounts change at the next boot"
            log.warning("%s: %s", vm.name, result["error"])
            return result
        result["ok"] = code == 0 and "accounts-synced" in out
        if not result["ok"]:
            result["error"] = f"the guest's account change failed (exit {code}): " \
                f"{out.strip()[-300:]}"
            log.warning("%s: %s", vm.name, result["error"])
        return result
