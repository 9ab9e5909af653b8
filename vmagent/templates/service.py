"""Template operations of the manager: create a template (boot, sync, save the state),
list/show/remove it. Warm-creating a VM from it is in :mod:`vmagent.clone`.

See :mod:`vmagent.templates` for the files and docs/templates.md for the whole story.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmagent.qemu import argv as qargv
from vmagent.qemu import disks
from vmagent.identity import hostkeys
from vmagent.identity import seed
from vmagent.errors import BadRequest, Conflict, QMPFailure, Timeout
from vmagent.fsutil import read_json, sha256_file
from vmagent.qemu.guest import guest_exec, wait_guest_agent
from vmagent.identity.reidentify import FORGET_KEYS_SH
from vmagent.spec import VMSpec, apply_defaults, check_name, format_size, parse_flag, \
    parse_timeout
from vmagent.vms.store import VMRecord, now_iso
from vmagent.templates.store import (CLONE_MARKER, STATE_FILE, BuildSteps, Template, TemplateStore,
                        rmtree_readonly)
from vmagent.vms.vm import VM

if TYPE_CHECKING:
    from vmagent.manager import Manager

log = logging.getLogger(__name__)

CREATE_TIMEOUT = 1200.0              # boot + cloud-init of the template VM, under TCG
SAVE_TIMEOUT = 600.0
GUEST_AGENT_WAIT = 60.0
# qemu 7.2 limits migration to 128 MiB/s by default; the guest is stopped, go flat out
MAX_BANDWIDTH = 1 << 40


class TemplateOps:
    """Template operations of the Manager (mixed into it)."""

    _template_store: TemplateStore | None = None

    @property
    def templates(self: "Manager") -> TemplateStore:   # type: ignore[misc]
        if self._template_store is None:
            self._template_store = TemplateStore(self.settings.state_dir / "templates")
        return self._template_store

    def _template_lock(self: "Manager", name: str) -> asyncio.Lock:  # type: ignore[misc]
        locks = self.__dict__.setdefault("_tpl_locks", {})
        return locks.setdefault(name, asyncio.Lock())

    def template_users(self: "Manager", name: str) -> list[str]:  # type: ignore[misc]
        """VMs whose disk is an overlay on the template's disk."""
        users = []
        for vm_name, vm in self.vms.items():
            with contextlib.suppress(OSError):
                if (vm.run_dir / CLONE_MARKER).read_text().strip() == name:
                    users.append(vm_name)
        return sorted(users)

    def templates_of_image(self: "Manager", image: str) -> list[str]:  # type: ignore[misc]
        """Templates (and removed templates' kept disks) built on ``image``."""
        out = [f"template {t.name}" for t in self.templates.list() if t.image == image]
        for orphan in self.templates.orphans():
            users = self.template_users(orphan)
            if users:
                out.append(f"the disk of removed template {orphan} (used by "
                           f"{', '.join(users)})")
        return out

    def _collect_orphans(self: "Manager") -> None:  # type: ignore[misc]
        for orphan in self.templates.orphans():
            if not self.template_users(orphan):
                log.info("removing the disk of removed template %s: no VM uses it", orphan)
                rmtree_readonly(self.templates.dir(orphan))

    # --- reading ---

    def _template_json(self: "Manager", tpl: Template) -> dict:  # type: ignore[misc]
        return {**tpl.to_json(), "path": str(tpl.path),
                "memory_h": format_size(tpl.memory), "disk_h": format_size(tpl.disk),
                "vms": self.template_users(tpl.name)}

    async def op_template_list(self: "Manager") -> dict:  # type: ignore[misc]
        self._collect_orphans()
        return {"templates": [{k: v for k, v in self._template_json(t).items()
                               if k != "argv"} for t in self.templates.list()]}

    async def op_template_show(self: "Manager", template: str) -> dict:  # type: ignore[misc]
        """A template; while it is being built (or just failed), its build steps."""
        building = self._tpl_building.get(template)
        if building is not None and not self.templates.exists(template):
            return building.status()
        return self._template_json(self.templates.get(template))

    @property
    def _tpl_building(self: "Manager") -> dict[str, BuildSteps]:  # type: ignore[misc]
        return self.__dict__.setdefault("_tpl_building_map", {})

    async def op_template_remove(self: "Manager", template: str,  # type: ignore[misc]
                                 force: Any = False) -> dict:
        force = parse_flag(force, "force")
        async with self._template_lock(template):
            tpl = self.templates.get(template)
            users = self.template_users(template)
            if users and not force:
                raise Conflict(f"template {template!r} is used by VM(s) "
                               f"{', '.join(users)} (their disks are overlays on it); "
                               "delete them first, or force: the template disappears "
                               "and its disk is kept until they are deleted",
                               vms=users)
            self.templates.remove(tpl.name, keep_disk=bool(users))
        return {"deleted": template, "disk_kept_for": users}

    # --- create ---

    async def op_template_create(self: "Manager", template: Any = None,  # type: ignore[misc]
                                 image: Any = None, timeout: Any = None,
                                 **fields: Any) -> dict:
        if not template:
            raise BadRequest("template (a name) is required")
        check_name(template)
        spec = VMSpec.from_dict({"name": template, "image": image, **fields})
        limit = parse_timeout(timeout, CREATE_TIMEOUT)
        lock = self._template_lock(template)
        if lock.locked():
            raise Conflict(f"template {template!r} is being created")
        async with lock:
            if self.templates.dir(template).exists():
                raise Conflict(f"template {template!r} already exists" if
                               self.templates.exists(template) else
                               f"the disk of a removed template {template!r} is still used "
                               f"by VM(s) {', '.join(self.template_users(template))}")
            steps = self._tpl_building[template] = BuildSteps(
                template, self.templates.root / f".console-{template}.log")
            try:
                return await self._build_template(spec, limit, steps)
            except BaseException as e:
                steps.fail(str(getattr(e, "message", e)) or type(e).__name__)
                raise
            finally:
                # a failed build's steps stay visible for a minute (vmctl shows them)
                asyncio.get_running_loop().call_later(
                    60, lambda: self._tpl_building.get(template) is steps
                    and self._tpl_building.pop(template))

    async def _build_template(self: "Manager", spec: VMSpec,  # type: ignore[misc]
                              limit: float, steps: BuildSteps) -> dict:
        t0 = time.monotonic()
        steps.step("image")
        img = await self._image_for(spec.image or self.settings.defaults.image, pull=True)
        spec = apply_defaults(spec, self.settings.defaults, img.virtual_size)
        rt = self._new_runtime(spec.name)
        staging = self.templates.new_dir(spec.name)
        steps.console_log = staging / qargv.CONSOLE_LOG
        vm: VM | None = None
        try:
            steps.step("disk")
            await disks.create_overlay(img.path, img.format, staging / qargv.DISK, spec.disk)
            keys = hostkeys.for_vm(spec.name, img.cloud_config, spec.extra_cloud_config())
            seed.write_seed_iso(staging / qargv.SEED, seed.render_seed(
                spec, rt.instance_id, rt.mac, img.cloud_config, keys))
            vm = VM(VMRecord(spec.name, staging, spec, rt))
            steps.step("boot")
            await self._launch(vm)
            log.info("template %s: booting from %s (pid %s)", spec.name, img.name,
                     vm.machine.pid())
            await self._wait_booted(vm, t0 + limit)
            booted = time.monotonic()
            steps.step("quiesce")
            qga = staging / qargv.QGA_SOCK
            await wait_guest_agent(qga, spec.name, GUEST_AGENT_WAIT)
            code, out = await guest_exec(qga, spec.name, "/bin/sh", ["-c", FORGET_KEYS_SH],
                                         timeout=120)
            if code != 0:
                raise QMPFailure(f"template {spec.name}: clearing authorized_keys and "
                                 f"syncing in the guest failed: {out}")
            steps.step("save")
            size, digest = await self._save_state(vm, staging / STATE_FILE)
            saved = time.monotonic()
            steps.step("freeze")
            await vm.quit()
            for f in (qargv.DISK, STATE_FILE):
                os.chmod(staging / f, 0o444)
            for f in (qargv.SEED, qargv.PIDFILE, qargv.QMP_SOCK, qargv.QGA_SOCK,
                      qargv.CONSOLE_SOCK, qargv.VNC_SOCK, "state.json"):
                (staging / f).unlink(missing_ok=True)
            tpl = Template(name=spec.name, image=img.name, cpus=spec.cpus,
                           memory=spec.memory, disk=spec.disk, mac=rt.mac,
                           vmgenid=rt.vmgenid, hostname=spec.name, admins=list(spec.admins),
                           state_size=size, state_sha256=digest, created=now_iso(),
                           build_seconds=round(saved - t0, 2),
                           save_seconds=round(saved - booted, 2),
                           argv=read_json(staging / "argv.json"),
                           accel=self.accel.name if self.accel else "tcg",
                           qemu_version=self.qemu_version)
            self.templates.save(tpl, staging)
            tpl.path = self.templates.commit(staging, spec.name)
            self.templates.mark_verified(tpl)
        except BaseException as e:
            steps.fail(str(getattr(e, "message", e)) or type(e).__name__)
            if vm is not None:
                with contextlib.suppress(Exception):
                    if vm.machine.alive():
                        await vm.quit()
                    await vm.detach()
            rmtree_readonly(staging)
            raise
        log.info("template %s: saved %s of state in %.1fs", tpl.name,
                 format_size(tpl.state_size), tpl.save_seconds)
        return self._template_json(tpl)

    async def _wait_booted(self: "Manager", vm: VM, deadline: float) -> None:  # type: ignore[misc]
        """SSH answers and cloud-init has finished (from the console log)."""
        while True:
            if not vm.machine.alive():
                raise QMPFailure(f"template {vm.name}: qemu exited while booting; console: "
                                 f"{console_tail(vm)}")
            if vm.boot_progress()["cloud_init"] == "done" and await vm.check_ssh():
                return
            if time.monotonic() > deadline:
                raise Timeout(f"template {vm.name}: not booted (SSH and cloud-init) in time; "
                              f"console: {console_tail(vm)}")
            await asyncio.sleep(1)

    async def _save_state(self: "Manager", vm: VM, path: Path) -> tuple[int, str]:  # type: ignore[misc]
        await vm.qmp("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        await vm.qmp("stop")
        await vm.qmp("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
        deadline = time.monotonic() + SAVE_TIMEOUT
        while True:
            st = await vm.qmp("query-migrate")
            status = st.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise QMPFailure(f"template {vm.name}: saving the state failed: "
                                 f"{st.get('error-desc', status)}")
            if time.monotonic() > deadline:
                raise Timeout(f"template {vm.name}: saving the state took over "
                              f"{SAVE_TIMEOUT:g}s")
            await asyncio.sleep(0.1)
        # exec: returns when cat has its input; wait until the file is complete
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        digest = await asyncio.to_thread(sha256_file, path)
        return path.stat().st_size, digest


def console_tail(vm: VM, n: int = 400) -> str:
    """The last ``n`` bytes of the VM's console log, for error messages."""
    try:
        data = (vm.run_dir / qargv.CONSOLE_LOG).read_bytes()[-n:]
    except OSError:
        return "(no console log)"
    return data.decode("utf-8", "replace").strip().replace("\r", "")
