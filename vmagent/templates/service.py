"""Template operations: create a template (boot, quiesce, save the state: a job whose
steps ``template_show`` reports while it runs), list, show, remove. Warm-creating a VM
from a template is :mod:`vmagent.templates.warm`.

See :mod:`vmagent.templates.store` for the files and docs/templates.md for the story.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from vmagent import rundir
from vmagent.context import RequestContext
from vmagent.errors import BadRequest, Conflict, QMPFailure, Timeout
from vmagent.fsutil import read_json, sha256_file
from vmagent.identity import hostkeys, seed
from vmagent.identity.reidentify import FORGET_KEYS_SH
from vmagent.jobs import Job, Jobs
from vmagent.poll import poll_until
from vmagent.qemu import disks
from vmagent.qemu.guest import guest_exec, wait_guest_agent
from vmagent.qemu.host import QemuHost
from vmagent.spec import Defaults, VMSpec, apply_defaults, check_name, format_size, \
    parse_flag, parse_timeout
from vmagent.templates.store import Template, TemplateStore
from vmagent.vms.create import Creator
from vmagent.vms.registry import VMRegistry
from vmagent.vms.store import VMRecord, now_iso
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)

KIND = "template_build"
STEPS = ("image", "disk", "boot", "quiesce", "save", "freeze")
CREATE_TIMEOUT = 1200.0              # boot + cloud-init of the template VM, under TCG
SAVE_TIMEOUT = 600.0
GUEST_AGENT_WAIT = 60.0
# qemu 7.2 limits migration to 128 MiB/s by default; the guest is stopped, go flat out
MAX_BANDWIDTH = 1 << 40


class TemplateService:
    def __init__(self, templates: TemplateStore, registry: VMRegistry, creator: Creator,
                 host: QemuHost, defaults: Defaults, jobs: Jobs) -> None:
        self.templates = templates
        self.registry = registry
        self.creator = creator
        self.host = host
        self.defaults = defaults
        self.jobs = jobs
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # --- who uses what ------------------------------------------------------------------

    def users(self, name: str) -> list[str]:
        """VMs whose disk is an overlay on the template's disk."""
        users = []
        for vm in self.registry:
            with contextlib.suppress(OSError):
                if (vm.run_dir / rundir.CLONE_OF).read_text().strip() == name:
                    users.append(vm.name)
        return users

    def of_image(self, image: str) -> list[str]:
        """Templates (and removed templates' kept disks) built on ``image``."""
        out = [f"template {t.name}" for t in self.templates.list() if t.image == image]
        for orphan in self.templates.orphans():
            users = self.users(orphan)
            if users:
                out.append(f"the disk of removed template {orphan} (used by "
                           f"{', '.join(users)})")
        return out

    def collect_orphans(self) -> None:
        for orphan in self.templates.orphans():
            if not self.users(orphan):
                log.info("removing the disk of removed template %s: no VM uses it", orphan)
                self.templates.remove(orphan, keep_disk=False)

    # --- reading ------------------------------------------------------------------------

    def _json(self, tpl: Template) -> dict:
        return {**tpl.to_json(), "path": str(tpl.path),
                "memory_h": format_size(tpl.memory), "disk_h": format_size(tpl.disk),
                "vms": self.users(tpl.name)}

    async def list(self, ctx: RequestContext) -> dict:
        self.collect_orphans()
        return {"templates": [{k: v for k, v in self._json(t).items() if k != "argv"}
                              for t in self.templates.list()]}

    async def show(self, ctx: RequestContext, template: str) -> dict:
        """A template; while it is being built (or just failed), its build job."""
        job = self.jobs.get(KIND, template)
        if job is not None and not self.templates.exists(template):
            return job.to_json()
        return self._json(self.templates.get(template))

    async def remove(self, ctx: RequestContext, template: str, force: Any = False) -> dict:
        force = parse_flag(force, "force")
        async with self.locks[template]:
            tpl = self.templates.get(template)
            users = self.users(template)
            if users and not force:
                raise Conflict(f"template {template!r} is used by VM(s) "
                               f"{', '.join(users)} (their disks are overlays on it); "
                               "delete them first, or force: the template disappears "
                               "and its disk is kept until they are deleted",
                               vms=users)
            self.templates.remove(tpl.name, keep_disk=bool(users))
        return {"deleted": template, "disk_kept_for": users}

    # --- create -------------------------------------------------------------------------

    async def create(self, ctx: RequestContext, template: Any = None, image: Any = None,
                     timeout: Any = None, **fields: Any) -> dict:
        if not template:
            raise BadRequest("template (a name) is required")
        check_name(template)
        spec = VMSpec.from_dict({"name": template, "image": image, **fields})
        limit = parse_timeout(timeout, CREATE_TIMEOUT)
        lock = self.locks[template]
        if lock.locked():
            raise Conflict(f"template {template!r} is being created")
        async with lock:
            if self.templates.dir(template).exists():
                raise Conflict(f"template {template!r} already exists" if
                               self.templates.exists(template) else
                               f"the disk of a removed template {template!r} is still used "
                               f"by VM(s) {', '.join(self.users(template))}")
            job = Job(KIND, template, steps=STEPS)
            result = await self.jobs.run(job, lambda job: self._build(ctx, spec, limit, job))
            assert result is not None
            return result

    async def _build(self, ctx: RequestContext, spec: VMSpec, limit: float,
                     job: Job) -> dict:
        t0 = time.monotonic()
        job.begin("image")
        # the template's guest gets its accounts; their keys are emptied before the save
        accounts = await self.creator.accounts(ctx.caller.user, spec, require_keys=False)
        img = await self.creator.image_for(spec.image or self.defaults.image, pull=True)
        spec = apply_defaults(spec, self.defaults, img.virtual_size)
        rt = self.creator.provisioner.new_runtime(spec.name)
        vm: VM | None = None
        with self.templates.staged(spec.name) as staged:
            path = staged.path
            job.set_log(path / rundir.CONSOLE_LOG)
            try:
                job.begin("disk")
                await disks.create_overlay(img.path, img.format, path / rundir.DISK,
                                           spec.disk)
                keys = hostkeys.for_vm(spec.name, img.cloud_config,
                                       spec.extra_cloud_config())
                seed.write_seed_iso(path / rundir.SEED, seed.render_seed(
                    spec, rt.instance_id, rt.mac, img.cloud_config, keys, accounts))
                vm = VM(VMRecord(spec.name, path, spec, rt))
                job.begin("boot")
                await self.creator.launcher.launch(vm)
                log.info("template %s: booting from %s (pid %s)", spec.name, img.name,
                         vm.machine.pid())
                await self._wait_booted(vm, t0 + limit - time.monotonic())
                booted = time.monotonic()
                job.begin("quiesce")
                await wait_guest_agent(vm.agent, GUEST_AGENT_WAIT)
                code, out = await guest_exec(vm.agent, "/bin/sh",
                                             ["-c", FORGET_KEYS_SH], timeout=120)
                if code != 0:
                    raise QMPFailure(f"template {spec.name}: clearing authorized_keys and "
                                     f"syncing in the guest failed: {out}")
                job.begin("save")
                size, digest = await self._save_state(vm, path / rundir.SAVED_STATE)
                saved = time.monotonic()
                job.begin("freeze")
                await vm.quit()
                for f in (rundir.DISK, rundir.SAVED_STATE):
                    os.chmod(path / f, 0o444)
                for f in (rundir.SEED, rundir.STATE, *rundir.RUNTIME_FILES):
                    (path / f).unlink(missing_ok=True)
                tpl = Template(name=spec.name, image=img.name, cpus=spec.cpus,
                               memory=spec.memory, disk=spec.disk, mac=rt.mac,
                               vmgenid=rt.vmgenid, hostname=spec.name,
                               admins=[a.name for a in accounts], state_size=size,
                               state_sha256=digest, created=now_iso(),
                               build_seconds=round(saved - t0, 2),
                               save_seconds=round(saved - booted, 2),
                               argv=read_json(path / rundir.ARGV),
                               accel=self.host.accel_name, qemu_version=self.host.version)
                self.templates.save(tpl, path)
                tpl.path = self.templates.commit(staged, spec.name)
                self.templates.mark_verified(tpl)
            except BaseException:
                job.keep_tail()           # the staged dir with the console log goes
                if vm is not None:
                    with contextlib.suppress(Exception):
                        if vm.machine.alive():
                            await vm.quit()
                        await vm.detach()
                raise
        log.info("template %s: saved %s of state in %.1fs", tpl.name,
                 format_size(tpl.state_size), tpl.save_seconds)
        return self._json(tpl)

    async def _wait_booted(self, vm: VM, limit: float) -> None:
        """SSH answers and cloud-init has finished (from the console log)."""
        async def booted() -> bool:
            if not vm.machine.alive():
                raise QMPFailure(f"template {vm.name}: qemu exited while booting; console: "
                                 f"{vm.console.tail_text()}")
            if vm.kernel_panicked():      # the boot is over: say so now, not at the deadline
                raise QMPFailure(f"template {vm.name}: the guest kernel panicked while "
                                 f"booting; console: {vm.console.tail_text()}")
            return vm.boot_progress()["cloud_init"] == "done" and await vm.check_ssh()

        await poll_until(booted, max(0.0, limit), interval=1.0, error=lambda: Timeout(
            f"template {vm.name}: not booted (SSH and cloud-init) in time; console: "
            f"{vm.console.tail_text()}"))

    async def _save_state(self, vm: VM, path: Path) -> tuple[int, str]:
        await vm.qmp("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        await vm.qmp("stop")
        await vm.qmp("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
        await migration_done(vm, SAVE_TIMEOUT, f"template {vm.name}: saving the state")
        # exec: returns when cat has its input; wait until the file is complete
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        digest = await asyncio.to_thread(sha256_file, path)
        return path.stat().st_size, digest


async def migration_done(vm: VM, timeout: float, what: str,
                         interval: float = 0.1) -> None:
    """Wait for a migration (out to a file, or in from one) to complete."""
    async def completed() -> bool:
        st = await vm.qmp("query-migrate")
        status = st.get("status")
        if status in ("failed", "cancelled") or not vm.machine.alive():
            raise QMPFailure(f"{what} failed: {st.get('error-desc', status)}; console: "
                             f"{vm.console.tail_text()}")
        return status == "completed"

    await poll_until(completed, timeout, interval=interval,
                     error=f"{what} took over {timeout:g}s")

