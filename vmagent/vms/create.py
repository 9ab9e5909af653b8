"""Creating a VM, as one transaction: validate the whole request before anything slow,
find (or pull) the image, apply the defaults, make the identity and the seed, stage and
commit the run dir, register the VM and start it. A VM that cannot start is not
half-created: it is not created at all. Until its create has answered, a VM's record
says so (``creating``), and an agent restarted meanwhile rolls it back
(:meth:`vmagent.vms.service.VMService.adopt`).

The warm create from a template (:mod:`vmagent.templates.warm`) uses the same steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from vmagent import faults
from vmagent.context import RequestContext
from vmagent.errors import Conflict
from vmagent.identity import accounts as accounts_mod
from vmagent.identity import hostkeys, seed
from vmagent.identity.accounts import Account
from vmagent.identity.keys import KeyRegistry
from vmagent.images.pulls import Pulls
from vmagent.images.store import Image, ImageStore
from vmagent.spec import Defaults, VMSpec, apply_defaults
from vmagent.vms.launcher import Launcher
from vmagent.vms.provision import Provisioner
from vmagent.vms.registry import VMRegistry
from vmagent.vms.store import Runtime, VMRecord
from vmagent.vms.vm import VM

if TYPE_CHECKING:                     # pragma: no cover
    from vmagent.alloc.service import Allocator

log = logging.getLogger(__name__)


class Creator:
    def __init__(self, registry: VMRegistry, provisioner: Provisioner, launcher: Launcher,
                 images: ImageStore, defaults: Defaults, keys: KeyRegistry,
                 pulls: Pulls, alloc: Allocator | None = None) -> None:
        self.registry = registry
        self.provisioner = provisioner
        self.launcher = launcher
        self.images = images
        self.defaults = defaults
        self.keys = keys
        self.pulls = pulls
        self.alloc = alloc

    def allocate(self, spec: VMSpec, dry_run: bool) -> VMSpec:
        """The spec with its allocation filled in (400 on nonsense), admitted on this
        host: its guarantees are reserved from here on (409 with the numbers when they
        do not fit; nothing is made). A dry run only checks."""
        if self.alloc is None:
            return spec
        spec = self.alloc.size(spec)
        self.alloc.admit(spec, dry_run)
        return spec

    async def accounts(self, owner: str, spec: VMSpec,
                       previous: list[Account] | None = None,
                       require_keys: bool = True) -> list[Account]:
        """The guest accounts of the owner and the admins, with their keys (400 when a
        person has none, if ``require_keys``)."""
        found, warnings = await accounts_mod.resolve(owner, spec.admins, spec.ssh_keys,
                                                     self.keys, previous,
                                                     require_keys=require_keys)
        for w in warnings:
            log.warning("%s: %s", spec.name, w)
        return found

    def own(self, rt: Runtime, ctx: RequestContext, accounts: list[Account]) -> None:
        """The caller owns the new VM."""
        rt.owner = ctx.caller.user
        rt.accounts = [a.to_json() for a in accounts]

    def check_new(self, name: str) -> None:
        if name in self.registry:
            raise Conflict(f"a VM named {name!r} already exists", vm=name)

    async def image_for(self, name: str, pull: bool) -> Image:
        if pull and not self.images.exists(name) and name in self.images.catalog:
            log.info("image %s is not in the store; pulling it", name)
            await self.pulls.wait(self.pulls.start(name))
        return self.images.resolve(name)

    def dry_run(self, spec: VMSpec, rt: Runtime, image: Image, files: dict[str, bytes],
                extra_argv: tuple[str, ...] = (), **more: Any) -> dict:
        rec = self.provisioner.record(spec, rt)
        if self.alloc is not None:
            more.setdefault("allocation", self.alloc.plan(spec))
        return {"dry_run": True, "spec": spec.to_dict(), "image": image.name, **more,
                "argv": self.launcher.argv(rec, image, extra_argv),
                "seed": {k: v.decode() for k, v in files.items()}}

    async def commit(self, rec: VMRecord, start: bool = True, **launch: Any) -> VM:
        """Register a staged VM and start it (``launch``: arguments of
        :meth:`Launcher.launch`); on failure it is removed again. The record stays
        marked ``creating`` until :meth:`done`."""
        vm = self.registry.add(rec)
        faults.point("create.staged")
        if start:
            try:
                await self.launcher.launch(vm, **launch)
                faults.point("create.launched")
            except BaseException:
                with contextlib.suppress(Exception):
                    await vm.quit()
                self.registry.discard(rec.name)
                self.registry.store.remove(rec.name)
                raise
        return vm

    def done(self, vm: VM) -> None:
        """The create answers: from now on the VM stays after a restart."""
        vm.rec.rt.creating = False
        self.registry.save(vm)

    async def cold(self, ctx: RequestContext, fields: dict[str, Any], dry_run: bool,
                   start: bool) -> tuple[VM | None, dict | None]:
        """A VM booted from its image: (the VM, None), or (None, the dry run)."""
        spec = VMSpec.from_dict(fields)
        self.check_new(spec.name)
        # the whole spec is checked before anything slow (an image pull) happens
        dataclasses.replace(spec, segment=spec.segment or
                            self.defaults.segment).check_allocation()
        spec = self.allocate(spec, dry_run)
        accounts = await self.accounts(ctx.caller.user, spec)
        image = await self.image_for(spec.image or self.defaults.image, pull=not dry_run)
        spec = apply_defaults(spec, self.defaults, image.virtual_size)
        rt = self.provisioner.new_runtime(spec.name)
        self.own(rt, ctx, accounts)
        keys = hostkeys.for_vm(spec.name, image.cloud_config, spec.extra_cloud_config(),
                               dry_run=dry_run)
        files = seed.render_seed(spec, rt.instance_id, rt.mac, image.cloud_config, keys,
                                 accounts)
        if dry_run:
            return None, self.dry_run(spec, rt, image, files)
        rec = await self.provisioner.stage(
            spec, rt, image.path, image.format, files,
            keys and (lambda run_dir: hostkeys.save(run_dir, keys)))
        return await self.commit(rec, start), None
