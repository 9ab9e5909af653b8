"""Warm create: a VM restored from a template's saved state, then re-identified through
the guest agent (:mod:`vmagent.identity.reidentify`) before it is reported running.
The create transaction is the cold create's (:class:`vmagent.vms.create.Creator`);
docs/templates.md tells the story.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shlex
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from vmagent import rundir
from vmagent.context import RequestContext
from vmagent.errors import BadRequest, ImageError, QMPFailure, Timeout
from vmagent.identity import hostkeys, seed
from vmagent.identity.reidentify import console_key_block, reidentify_argv
from vmagent.qemu.console import ConsoleLog
from vmagent.qemu import argv as qargv
from vmagent.qemu.guest import guest_exec
from vmagent.qemu.host import QemuHost
from vmagent.spec import VMSpec, apply_defaults, format_size
from vmagent.templates.service import GUEST_AGENT_WAIT, TemplateService, migration_done
from vmagent.templates.store import Template
from vmagent.vms.create import Creator
from vmagent.vms.status import vm_status
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)

RESTORE_TIMEOUT = 300.0
BANNER_WAIT = 60.0
INCOMING = ("-incoming", "defer")


class WarmCreator:
    def __init__(self, creator: Creator, templates: TemplateService,
                 host: QemuHost) -> None:
        self.creator = creator
        self.templates = templates
        self.host = host

    async def create(self, ctx: RequestContext, template: Any, fields: dict[str, Any],
                     dry_run: bool, start: bool,
                     mark: Callable[[Path], None] | None = None) -> dict:
        """``mark``: writes what else the clone's run dir holds before it appears (a
        warm pool's membership)."""
        if not isinstance(template, str):
            raise BadRequest("template: expected a template name")
        tpl = self.templates.templates.get(template)
        given = VMSpec.from_dict(fields)
        # the clone's device model and RAM are the template's
        for key, have in (("image", tpl.image), ("cpus", tpl.cpus),
                          ("memory", tpl.memory), ("disk", tpl.disk)):
            value = getattr(given, key)
            if value is not None and value != have:
                shown = format_size if key in ("memory", "disk") else str
                raise BadRequest(
                    f"{key}: a VM warm-started from template {tpl.name!r} has the "
                    f"template's {key} ({shown(have)}), not {shown(value)}; create a "
                    f"template with {key} {shown(value)}, or create the VM without "
                    "--template", template=tpl.name)
        if not start and not dry_run:
            raise BadRequest("start: a warm start from a template starts the VM; "
                             "--no-start is not available with --template")
        self.creator.check_new(given.name)
        accounts = await self.creator.accounts(ctx.caller.user, given)
        img = self.creator.images.resolve(tpl.image)
        # sized with the template's RAM and admitted (reserved) before anything is made
        spec = apply_defaults(self.creator.allocate(dataclasses.replace(
            given, image=tpl.image, cpus=tpl.cpus, memory=tpl.memory, disk=tpl.disk),
            dry_run), self.creator.defaults, img.virtual_size)
        rt = self.creator.provisioner.new_runtime(spec.name, mac=tpl.mac)
        rt.device_model = qargv.model_of(tpl.argv)    # the saved state's CPU and devices
        self.creator.own(rt, ctx, accounts)
        # the clone's host keys, in its seed for the next boots (unless the caller's
        # user-data makes its own at the next boot) and given by re-identification now
        keys = hostkeys.for_vm(spec.name, img.cloud_config, spec.extra_cloud_config(),
                               dry_run=dry_run)
        files = seed.render_seed(spec, rt.instance_id, rt.mac, img.cloud_config, keys,
                                 accounts)
        if dry_run:
            return self.creator.dry_run(spec, rt, img, files, INCOMING, template=tpl.name)
        own = keys is not None
        keys = keys or hostkeys.generate(f"root@{spec.name}")
        if (tpl.qemu_version, tpl.accel) != (self.host.version, self.host.accel_name):
            # the saved device state fits the qemu (machine type, CPU model) that saved it
            raise ImageError(f"template {tpl.name!r} was saved by qemu {tpl.qemu_version} "
                             f"with {tpl.accel}; this agent runs qemu {self.host.version} "
                             f"with {self.host.accel_name}: create the template again",
                             template=tpl.name)
        t0 = time.monotonic()
        async with self.templates.locks[tpl.name]:
            await self.templates.templates.verify(tpl)

            def clone_files(run_dir: Path) -> None:
                (run_dir / rundir.CLONE_OF).write_text(tpl.name + "\n")
                if own:                       # reported in the status; vmctl pins them
                    hostkeys.save(run_dir, keys)
                else:                         # vmctl finds them in the console log
                    ConsoleLog(run_dir / rundir.CONSOLE_LOG).append(console_key_block(keys))
                if mark is not None:
                    mark(run_dir)

            rec = await self.creator.provisioner.stage(spec, rt, tpl.disk_path, "qcow2",
                                                       files, clone_files)
        timings: dict[str, Any] = {"prepare_s": round(time.monotonic() - t0, 3)}

        async def restore(vm: VM) -> None:
            await self._restore(vm, tpl, keys, timings)

        vm = await self.creator.commit(rec, extra_argv=INCOMING, restore=restore)
        if spec.user_data:
            # the caller's cloud-config runs at the clone's next boot, not in the restore
            rt.config_pending = True
        self.creator.done(vm)
        timings["total_s"] = round(time.monotonic() - t0, 3)
        log.info("%s: warm-started from template %s: %s", spec.name, tpl.name, timings)
        return {**vm_status(vm, ctx.caller.user), "template": tpl.name,
                "host_keys": hostkeys.public(keys), "warm": timings}

    async def reidentify(self, vm: VM, tpl: Template, keys: hostkeys.Keys,
                         timings: dict[str, Any]) -> None:
        """The clone's identity (hostname, machine-id, host keys, its people's keys,
        the RNG and the clock) through the guest agent, as root."""
        args = reidentify_argv(vm.name, vm.accounts, keys, uuid.uuid4().hex, time.time(),
                               os.urandom(64), tpl.admins)
        code, out = await guest_exec(vm.agent, "/usr/bin/perl", args, timeout=120,
                                     agent_wait=GUEST_AGENT_WAIT)
        if code != 0 or "reidentified" not in out:
            raise QMPFailure(f"{vm.name}: re-identifying the clone failed (exit {code}): "
                             f"{out.strip()[-500:]}")
        timings["rng_reseeded"] = "rng-reseeded" in out
        marks = [ln.split()[1:3] for ln in out.splitlines() if ln.startswith("T ")]
        if marks:   # where the program spent its time (guest seconds)
            timings["guest_steps"] = {label: round(float(t) - float(marks[i][0]), 3)
                                      for i, (t, label) in enumerate(marks[1:])}

    async def _restore(self, vm: VM, tpl: Template, keys: hostkeys.Keys,
                       timings: dict[str, Any]) -> None:
        """Load the state into the just-started qemu, run it, re-identify the guest."""
        t0 = time.monotonic()
        await vm.qmp("migrate-incoming",
                     {"uri": f"exec:cat {shlex.quote(str(tpl.state_path))}"})
        await migration_done(vm, RESTORE_TIMEOUT,
                             f"{vm.name}: loading the state of template {tpl.name}",
                             interval=0.02)
        if not (await vm.qmp("query-status")).get("running"):
            await vm.qmp("cont")
        loaded = time.monotonic()
        timings["restore_s"] = round(loaded - t0, 3)
        # sshd is listening since the restore; its first connection runs cold (TCG
        # translates sshd again), so the wait for its banner overlaps the re-identification
        banner = asyncio.create_task(vm.wait_banner(BANNER_WAIT))
        try:
            await self.reidentify(vm, tpl, keys, timings)
            timings["reidentify_s"] = round(time.monotonic() - loaded, 3)
            if not await banner:   # it may have raced with the host key change: again
                if not await vm.wait_banner(BANNER_WAIT):
                    raise Timeout(f"{vm.name}: sshd did not answer after the restore")
        finally:
            banner.cancel()
        vm.ssh_ready, vm.net_alive, vm.ssh_checked = True, True, time.monotonic()
        timings["ssh_s"] = round(time.monotonic() - t0, 3)
