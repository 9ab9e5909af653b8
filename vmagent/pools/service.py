"""Warm pools: the operations (pool_create, pool_list, pool_show, pool_remove), the
take (``create`` with ``pool``) and the background refill.

A pool P of size N keeps N members: VMs warm-started from its template under the names
``P-pXXXXXX``, owned by the pool's creator, ephemeral (a member that powers off is
deleted, and replaced), re-identified and then paused. Each member's run dir holds its
mark (:data:`vmagent.rundir.POOL_MEMBER`: the pool, ready or not). The pool's places
count against the host's capacity: the empty ones are held in the ledger under
``pool:P`` (pool_create is refused with the numbers when N do not fit), the members
hold their own. One member is made at a time, for all pools (CPU is what a warm start
costs). After a restart the definitions are read back and the members found by their
marks (one that was not ready yet is deleted and made again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from vmagent.context import RequestContext
from vmagent.errors import BadRequest, Conflict, NotFound, VMAgentError
from vmagent.pools.handover import Handover
from vmagent.pools.warmup import Warmup
from vmagent.pools.store import (PoolDef, PoolStore, check_pool_name, check_size,
                                 read_mark, write_mark)
from vmagent.spec import VMSpec
from vmagent.templates.service import TemplateService
from vmagent.templates.store import Template
from vmagent.templates.warm import WarmCreator
from vmagent.vms.registry import VMRegistry
from vmagent.vms.state import State
from vmagent.vms.status import ssh_user, vm_status
from vmagent.vms.vm import VM

if TYPE_CHECKING:                     # pragma: no cover
    from vmagent.alloc.service import Allocator

log = logging.getLogger(__name__)

RETRY = 15.0            # a pool whose last fill failed is tried again after this
IDLE = 5.0              # the refill looks again at least this often
# after a take the refill waits this long: the taker's first connection and command
# get the CPU, not another clone's restore
TAKE_GRACE = 5.0
# fields a taken VM gets from the request; the rest is the template's
TAKEN_FIELDS = {"name", "ssh_keys", "admins", "ephemeral", "ttl"}


def template_spec(tpl: Template, name: str) -> VMSpec:
    return VMSpec(name=name, image=tpl.image, cpus=tpl.cpus, memory=tpl.memory,
                  disk=tpl.disk)


class PoolService:
    def __init__(self, store: PoolStore, registry: VMRegistry, warm: WarmCreator,
                 templates: TemplateService, remove: Callable[[VM], Awaitable[None]],
                 alloc: Allocator | None = None) -> None:
        self.store = store
        self.registry = registry
        self.warm = warm
        self.templates = templates
        self.remove = remove
        self.alloc = alloc
        self.handover = Handover(registry, warm, remove)
        self.pools: dict[str, PoolDef] = {}
        self.errors: dict[str, str] = {}          # the last failed fill of a pool
        self.retry_at: dict[str, float] = {}
        self.filling: dict[str, str] = {}         # pool -> the member being made
        self.taken_at = 0.0                       # monotonic time of the last take
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # --- membership -------------------------------------------------------------------

    def members(self, pool: str, ready: bool | None = None) -> list[VM]:
        out = []
        for vm in self.registry:
            mark = read_mark(vm.run_dir)
            if mark is None or mark["pool"] != pool or vm.rec.rt.creating:
                continue
            if ready is None or bool(mark.get("ready")) == ready:
                out.append(vm)
        return out

    def _template(self, pool: PoolDef) -> Template:
        return self.templates.templates.get(pool.template)

    def _reserve(self, pool: PoolDef, empty: int, check: bool = False) -> None:
        """The pool's empty places, held against the host's capacity."""
        if self.alloc is None:
            return
        try:
            spec = template_spec(self._template(pool), f"{pool.name}-pool")
        except VMAgentError:
            spec = None
        if spec is None:
            self.alloc.ledger.release(f"pool:{pool.name}")
        else:
            self.alloc.reserve(f"pool:{pool.name}", spec, empty, check=check)

    def _doc(self, pool: PoolDef) -> dict[str, Any]:
        ready = [vm.name for vm in self.members(pool.name, ready=True)]
        members = [vm.name for vm in self.members(pool.name)]
        return {"pool": pool.name, "template": pool.template, "size": pool.size,
                "owner": pool.owner, "created": pool.created, "ready": len(ready),
                "members": members, "filling": self.filling.get(pool.name),
                "error": self.errors.get(pool.name)}

    def get(self, name: Any) -> PoolDef:
        check_pool_name(name)
        pool = self.pools.get(name)
        if pool is None:
            raise NotFound(f"no pool named {name!r} (vmctl pool list)", pool=name)
        return pool

    # --- operations -------------------------------------------------------------------

    async def create(self, ctx: RequestContext, pool: Any = None, template: Any = None,
                     size: Any = None) -> dict:
        name = check_pool_name(pool)
        if not isinstance(template, str) or not template:
            raise BadRequest("template: the template the pool's VMs are clones of")
        count = check_size(size)
        tpl = self.templates.templates.get(template)     # 404 when there is none
        if name in self.pools:
            raise Conflict(f"a pool named {name!r} already exists", pool=name)
        await self.warm.creator.accounts(ctx.caller.user, template_spec(tpl, name))
        new = PoolDef(name, tpl.name, count, ctx.caller.user, time.time())
        self._reserve(new, count, check=True)   # 409 with the numbers: nothing made
        self.store.save(new)
        self.pools[name] = new
        self._wake.set()
        log.info("pool %s: %d clone(s) of template %s", name, count, tpl.name)
        return self._doc(new)

    async def list(self, ctx: RequestContext) -> dict:
        return {"pools": [self._doc(p) for _, p in sorted(self.pools.items())]}

    async def show(self, ctx: RequestContext, pool: str) -> dict:
        return self._doc(self.get(pool))

    async def remove_pool(self, ctx: RequestContext, pool: str) -> dict:
        found = self.get(pool)
        self.store.remove(found.name)
        del self.pools[found.name]
        self.errors.pop(found.name, None)
        if self.alloc is not None:
            self.alloc.ledger.release(f"pool:{found.name}")
        deleted = []
        for vm in self.members(found.name):
            async with self.registry.locked(vm.name):
                if self.registry.find(vm.name) is vm and read_mark(vm.run_dir):
                    await self.remove(vm)
                    deleted.append(vm.name)
        return {"removed": found.name, "deleted": deleted}

    async def take(self, ctx: RequestContext, pool: Any, fields: dict[str, Any],
                   dry_run: bool) -> dict:
        """``create`` with ``pool``: a ready member becomes the caller's VM."""
        found = self.get(pool)
        extra = sorted(k for k, v in fields.items()
                       if k not in TAKEN_FIELDS and v not in (None, "", []))
        if extra:
            raise BadRequest(f"{', '.join(extra)}: a VM taken from pool {found.name!r} is "
                             f"a clone of template {found.template!r} as it is; leave "
                             f"{'it' if len(extra) == 1 else 'them'} out", pool=found.name)
        given = VMSpec.from_dict(fields)
        self.warm.creator.check_new(given.name)
        tpl = self._template(found)
        accounts = await self.warm.creator.accounts(ctx.caller.user, given)
        ready = self.members(found.name, ready=True)
        if dry_run:
            return {"dry_run": True, "pool": found.name, "template": tpl.name,
                    "spec": given.to_dict(), "ready": len(ready)}
        for vm in ready:
            async with vm.lock:
                mark = read_mark(vm.run_dir)
                if (self.registry.find(vm.name) is not vm or not mark
                        or not mark.get("ready") or vm.rec.rt.state != State.RUNNING):
                    continue
                timings = await self.handover.take(vm, ctx, given, accounts, tpl)
            self.taken_at = time.monotonic()
            self._wake.set()
            return {**vm_status(vm, ctx.caller.user), "pool": found.name,
                    "template": tpl.name, "handover": timings}
        filling = f" (one is being made: {self.filling[found.name]})" \
            if found.name in self.filling else ""
        raise Conflict(f"pool {found.name!r} has no ready VM now{filling}; try again "
                       f"shortly, or create from template {tpl.name!r}",
                       pool=found.name, refused="empty")

    # --- the background refill ----------------------------------------------------------

    async def start(self) -> None:
        """Read the definitions back, drop members that were never ready, start the
        refill."""
        self.pools = self.store.load_all()
        for vm in list(self.registry):
            mark = read_mark(vm.run_dir)
            if mark is None:
                continue
            if mark["pool"] not in self.pools or not mark.get("ready"):
                log.warning("%s: a member of pool %s that was %s: deleting it", vm.name,
                            mark["pool"], "removed" if mark["pool"] not in self.pools
                            else "not ready yet")
                async with self.registry.locked(vm.name):
                    if self.registry.find(vm.name) is vm:
                        await self.remove(vm)
            else:
                vm.ssh_checked = float("inf")        # paused: no banner to check
        for pool in self.pools.values():
            self._reserve(pool, pool.size - len(self.members(pool.name)))
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            made = False
            try:
                made = await self.fill_one()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the refill must survive any one pool
                log.exception("pool refill failed")
            if not made:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE)
                except asyncio.TimeoutError:
                    pass

    async def fill_one(self) -> bool:
        """Make one member for the first pool short of its size; whether it tried."""
        now = time.monotonic()
        if now - self.taken_at < TAKE_GRACE:
            await asyncio.sleep(TAKE_GRACE - (now - self.taken_at))
            return True
        for pool in sorted(self.pools.values(), key=lambda p: p.name):
            have = len(self.members(pool.name))
            if have >= pool.size:
                self._reserve(pool, 0)
                continue
            if self.retry_at.get(pool.name, 0) > now:
                continue
            await self._make_member(pool, have)
            return True
        return False

    async def _make_member(self, pool: PoolDef, have: int) -> None:
        name = f"{pool.name}-p{os.urandom(3).hex()}"
        self.filling[pool.name] = name
        self._reserve(pool, pool.size - have - 1)     # this member holds its own
        ctx = RequestContext.internal(pool.owner)
        creating = (self.alloc.creating(name) if self.alloc is not None
                    else contextlib.nullcontext())
        t0 = time.monotonic()
        warmup = Warmup()
        try:
            key = await warmup.make_key()
            with creating:      # what the create reserved: held by the member after it
                await self.warm.create(ctx, pool.template, {"name": name,
                                                            "ephemeral": True,
                                                            "ssh_keys": [key]},
                                       dry_run=False, start=True,
                                       mark=lambda d: write_mark(d, pool.name, False))
            vm = self.registry.get(name)
            async with vm.lock:
                if self.pools.get(pool.name) is not pool:     # removed meanwhile
                    log.info("pool %s: removed while %s was made: deleting it",
                             pool.name, name)
                    await self.remove(vm)
                    return
                # its sshd translated once (TCG keeps it while paused); the key goes
                # at the hand-over, which writes the taker's keys only
                warmed = await warmup.login(ssh_user(vm, pool.owner), vm.rec.rt.ssh_port)
                warmup.close()
                vm.rec.spec.ssh_keys = []
                self.registry.store.save_spec(vm.rec)
                await vm.qmp("stop")
                vm.ssh_checked = float("inf")         # paused: no banner to check
                write_mark(vm.run_dir, pool.name, True)
            self.errors.pop(pool.name, None)
            self.retry_at.pop(pool.name, None)
            log.info("pool %s: member %s ready in %.1fs%s", pool.name, name,
                     time.monotonic() - t0, "" if warmed else " (its sshd not warmed)")
        except (VMAgentError, OSError) as e:
            message = e.message if isinstance(e, VMAgentError) else str(e)
            self.errors[pool.name] = message
            self.retry_at[pool.name] = time.monotonic() + RETRY
            log.warning("pool %s: making a member failed: %s", pool.name, message)
            vm = self.registry.find(name)
            if vm is not None:
                async with vm.lock:
                    await self.remove(vm)
        finally:
            warmup.close()
            self.filling.pop(pool.name, None)
            if pool.name in self.pools:
                self._reserve(pool, pool.size - len(self.members(pool.name)))
