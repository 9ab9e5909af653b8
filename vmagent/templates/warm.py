"""Warm create: a VM restored from a template's saved state (:mod:`vmagent.warm`), then
re-identified through the guest agent (:mod:`vmagent.reidentify`) before it is reported
running. A mixin of :class:`vmagent.manager.Manager`; docs/templates.md tells the story.
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
from typing import TYPE_CHECKING, Any

from vmagent.qemu import argv as qargv
from vmagent.identity import hostkeys
from vmagent.identity import seed
from vmagent.errors import BadRequest, Conflict, ImageError, QMPFailure, Timeout
from vmagent.qemu.guest import guest_exec
from vmagent.identity.reidentify import console_key_block, reidentify_argv
from vmagent.spec import VMSpec, apply_defaults, format_size
from vmagent.templates.store import CLONE_MARKER, Template
from vmagent.vms.vm import VM, ssh_banner
from vmagent.templates.service import GUEST_AGENT_WAIT, console_tail
from vmagent.vms.watcher import vm_status

if TYPE_CHECKING:
    from vmagent.manager import Manager

log = logging.getLogger(__name__)

RESTORE_TIMEOUT = 300.0


class CloneOps:
    async def _warm_create(self: "Manager", template: Any, dry_run: bool,  # type: ignore[misc]
                           start: bool, fields: dict[str, Any]) -> dict:
        if not isinstance(template, str):
            raise BadRequest("template: expected a template name")
        tpl = self.templates.get(template)
        given = VMSpec.from_dict(fields)
        # the clone's device model and RAM are the template's
        for key, have in (("image", tpl.image), ("cpus", tpl.cpus),
                          ("memory", tpl.memory), ("disk", tpl.disk)):
            value = getattr(given, key)
            if value is not None and value != have:
                shown = (lambda v: format_size(v)) if key in ("memory", "disk") else str
                raise BadRequest(
                    f"{key}: a VM warm-started from template {tpl.name!r} has the "
                    f"template's {key} ({shown(have)}), not {shown(value)}; create a "
                    f"template with {key} {shown(value)}, or create the VM without "
                    "--template", template=tpl.name)
        if not start and not dry_run:
            raise BadRequest("start: a warm start from a template starts the VM; "
                             "--no-start is not available with --template")
        if given.name in self.vms:
            raise Conflict(f"a VM named {given.name!r} already exists", vm=given.name)
        img = self.images.resolve(tpl.image)
        spec = apply_defaults(dataclasses.replace(given, image=tpl.image, cpus=tpl.cpus,
                                                  memory=tpl.memory, disk=tpl.disk),
                              self.settings.defaults, img.virtual_size)
        rt = self._new_runtime(spec.name, mac=tpl.mac)
        # the clone's host keys, in its seed for the next boots (unless the caller's
        # user-data makes its own at the next boot) and given by re-identification now
        keys = hostkeys.for_vm(spec.name, img.cloud_config, spec.extra_cloud_config(),
                               dry_run=dry_run)
        files = seed.render_seed(spec, rt.instance_id, rt.mac, img.cloud_config, keys)
        if dry_run:
            return self._dry_run(spec, rt, img, files, ("-incoming", "defer"),
                                 template=tpl.name)
        own = keys is not None
        keys = keys or hostkeys.generate(f"root@{spec.name}")
        accel = self.accel.name if self.accel else "tcg"
        if (tpl.qemu_version, tpl.accel) != (self.qemu_version, accel):
            # the saved device state fits the qemu (machine type, CPU model) that saved it
            raise ImageError(f"template {tpl.name!r} was saved by qemu {tpl.qemu_version} "
                             f"with {tpl.accel}; this agent runs qemu {self.qemu_version} "
                             f"with {accel}: create the template again",
                             template=tpl.name)
        t0 = time.monotonic()
        async with self._template_lock(tpl.name):
            await self.templates.verify(tpl)

            def clone_files(run_dir: Path) -> None:
                (run_dir / CLONE_MARKER).write_text(tpl.name + "\n")
                if own:                       # reported in the status; vmctl pins them
                    hostkeys.save(run_dir, keys)
                else:                         # vmctl finds them in the console log
                    with open(run_dir / qargv.CONSOLE_LOG, "ab") as f:
                        f.write(console_key_block(keys))

            rec = await self._stage(spec, rt, tpl.disk_path, "qcow2", files, clone_files)
        prepared = time.monotonic()
        timings: dict[str, float] = {"prepare_s": round(prepared - t0, 3)}

        async def restore(vm: VM) -> None:
            await self._restore(vm, tpl, keys, timings)

        vm = await self._add(rec, extra_argv=["-incoming", "defer"], restore=restore)
        if spec.user_data:
            # the caller's cloud-config runs at the clone's next boot, not in the restore
            rt.config_pending = True
            self.store.save_state(rec)
        timings["total_s"] = round(time.monotonic() - t0, 3)
        log.info("%s: warm-started from template %s: %s", spec.name, tpl.name, timings)
        return {**vm_status(vm), "template": tpl.name,
                "host_keys": hostkeys.public(keys), "warm": timings}

    async def _reidentify(self: "Manager", vm: VM, tpl: Template,  # type: ignore[misc]
                          keys: dict[str, tuple[str, str]],
                          timings: dict[str, float]) -> None:
        args = reidentify_argv(vm.name, vm.rec.spec, keys, uuid.uuid4().hex, time.time(),
                               os.urandom(64), tpl.admins)
        code, out = await guest_exec(vm.run_dir / qargv.QGA_SOCK, vm.name, "/usr/bin/perl",
                                     args, timeout=120, agent_wait=GUEST_AGENT_WAIT)
        if code != 0 or "reidentified" not in out:
            raise QMPFailure(f"{vm.name}: re-identifying the clone failed (exit {code}): "
                             f"{out.strip()[-500:]}")
        timings["rng_reseeded"] = "rng-reseeded" in out       # type: ignore[assignment]
        marks = [ln.split()[1:3] for ln in out.splitlines() if ln.startswith("T ")]
        if marks:   # where the program spent its time (guest seconds)
            timings["guest_steps"] = {label: round(float(t) - float(marks[i][0]), 3)  # type: ignore[assignment]
                                      for i, (t, label) in enumerate(marks[1:])}

    async def _restore(self: "Manager", vm: VM, tpl: Template,  # type: ignore[misc]
                       keys: dict[str, tuple[str, str]], timings: dict[str, float]) -> None:
        """Load the state into the just-started qemu, run it, re-identify the guest."""
        t0 = time.monotonic()
        await vm.qmp("migrate-incoming",
                     {"uri": f"exec:cat {shlex.quote(str(tpl.state_path))}"})
        deadline = t0 + RESTORE_TIMEOUT
        while True:
            st = await vm.qmp("query-migrate")
            status = st.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled") or not vm.machine.alive():
                raise QMPFailure(f"{vm.name}: loading the state of template {tpl.name} "
                                 f"failed: {st.get('error-desc', status)}; console: "
                                 f"{console_tail(vm)}", template=tpl.name)
            if time.monotonic() > deadline:
                raise Timeout(f"{vm.name}: loading the state of template {tpl.name} took "
                              f"over {RESTORE_TIMEOUT:g}s")
            await asyncio.sleep(0.02)
        if not (await vm.qmp("query-status")).get("running"):
            await vm.qmp("cont")
        loaded = time.monotonic()
        timings["restore_s"] = round(loaded - t0, 3)
        # sshd is listening since the restore; its first connection runs cold (TCG
        # translates sshd again), so the wait for its banner overlaps the re-identification
        banner = asyncio.create_task(_wait_banner(vm, 60))
        try:
            await self._reidentify(vm, tpl, keys, timings)
            timings["reidentify_s"] = round(time.monotonic() - loaded, 3)
            if not await banner:   # it may have raced with the host key change: again
                if not await _wait_banner(vm, 60):
                    raise Timeout(f"{vm.name}: sshd did not answer after the restore")
        finally:
            banner.cancel()
        vm.ssh_ready, vm.ssh_checked = True, time.monotonic()
        timings["ssh_s"] = round(time.monotonic() - t0, 3)


async def _wait_banner(vm: VM, limit: float) -> bool:
    """Patient connections: short timeouts would only start more cold sshd processes."""
    deadline = time.monotonic() + limit
    while not await ssh_banner("127.0.0.1", vm.rec.rt.ssh_port, timeout=20):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
