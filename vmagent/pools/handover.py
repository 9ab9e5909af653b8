"""Handing a pool's member over: the paused clone becomes the caller's VM under its
final name, in well under a second.

The member was warm-started from the template, re-identified (its own host keys,
machine-id, RNG) and paused when the pool was filled. The hand-over renames it (its
run dir moves; qemu keeps running), makes it the caller's (owner, accounts, ephemeral,
TTL from now), resumes it, and gives the guest its final hostname, the caller's keys
and the clock: through the guest agent's own file and clock commands when the member
has the caller's accounts (:mod:`vmagent.pools.quickid`), else through one run of the
re-identification program (:mod:`vmagent.identity.reidentify`, the warm start's). A member that fails this is
deleted: the caller gets the error, never a half-handed VM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from vmagent.context import RequestContext
from vmagent.errors import QMPFailure, Timeout
from vmagent.identity import hostkeys
from vmagent.identity.accounts import Account
from vmagent.pools import quickid
from vmagent.pools.store import clear_mark
from vmagent.spec import VMSpec
from vmagent.templates.store import Template
from vmagent.templates.warm import BANNER_WAIT, WarmCreator
from vmagent.vms.registry import VMRegistry
from vmagent.vms.store import now_iso
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)


class Handover:
    def __init__(self, registry: VMRegistry, warm: WarmCreator,
                 remove: Callable[[VM], Awaitable[None]]) -> None:
        self.registry = registry
        self.warm = warm
        self.remove = remove

    async def take(self, vm: VM, ctx: RequestContext, given: VMSpec,
                   accounts: list[Account], tpl: Template) -> dict[str, Any]:
        """Make the member ``vm`` the caller's VM ``given.name`` (the caller holds the
        member's lock); the hand-over's timings."""
        t0 = time.monotonic()
        old = vm.name
        keys = vm.host_keys or hostkeys.load(vm.run_dir)
        if keys is None:
            raise QMPFailure(f"{old}: the pool member has no host keys of the agent's")
        self.registry.rename(vm, given.name)
        alloc = self.warm.creator.alloc
        if alloc is not None:
            alloc.renamed(old, vm)
        timings: dict[str, Any] = {"member": old}
        member_accounts = list(vm.rec.rt.accounts or [])
        try:
            spec, rt = vm.rec.spec, vm.rec.rt
            spec.ephemeral, spec.ttl = given.ephemeral, given.ttl
            spec.ssh_keys, spec.admins = list(given.ssh_keys), list(given.admins)
            rt.owner = ctx.caller.user
            rt.accounts = [a.to_json() for a in accounts]
            rt.created = now_iso()                 # the TTL counts from the hand-over
            self.registry.store.save(vm.rec)
            clear_mark(vm.run_dir)
            await vm.qmp("cont")
            timings["resume_s"] = round(time.monotonic() - t0, 3)
            # the quick path leaves sshd as it was: it answered (the fill's warm-up
            # login) before the member was paused, and the guest agent's answers show
            # the guest runs again (a banner check alongside would only compete with
            # the caller's login); the re-identification program's path is the warm
            # start's, which rewrites sshd's host key files and config and ends with
            # a banner under them: it keeps that wait
            if await quickid.give(vm.agent, vm.name, accounts, member_accounts, timings):
                timings["identity"] = "guest agent"
                timings["reidentify_s"] = round(time.monotonic() - t0, 3)
            else:
                banner = asyncio.create_task(vm.wait_banner(BANNER_WAIT))
                try:
                    await self.warm.reidentify(vm, tpl, keys, timings)
                    timings["identity"] = "re-identification program"
                    timings["reidentify_s"] = round(time.monotonic() - t0, 3)
                    if not await banner and not await vm.wait_banner(BANNER_WAIT):
                        raise Timeout(f"{vm.name}: sshd did not answer after the "
                                      "hand-over")
                finally:
                    banner.cancel()
            vm.ssh_ready, vm.ssh_checked = True, time.monotonic()
        except BaseException:
            log.exception("%s: handing pool member %s over failed; deleting it",
                          vm.name, old)
            await asyncio.shield(self.remove(vm))
            raise
        timings["total_s"] = round(time.monotonic() - t0, 3)
        log.info("%s: handed over from pool member %s: %s", vm.name, old, timings)
        return timings
