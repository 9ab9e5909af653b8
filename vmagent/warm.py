"""Template operations of the manager: create a template (boot, sync, save the state),
list/show/remove it, and warm-create a VM from it (restore, re-identify, SSH).

See :mod:`vmagent.templates` for the files and docs/templates.md for the whole story.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shlex
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import argv as qargv
from . import disks, hostkeys, seed
from .errors import BadRequest, Conflict, ImageError, QMPFailure, Timeout
from .fsutil import read_json, sha256_file
from .guest import guest_exec, wait_guest_agent
from .reidentify import FORGET_KEYS_SH, console_key_block, reidentify_argv
from .spec import VMSpec, apply_defaults, check_name, format_size, parse_flag, \
    parse_timeout
from .store import VMRecord, now_iso
from .templates import (CLONE_MARKER, STATE_FILE, BuildSteps, Template, TemplateStore,
                        rmtree_readonly)
from .vm import VM, ssh_banner
from .watch import vm_status

if TYPE_CHECKING:
    from .manager import Manager

log = logging.getLogger(__name__)

CREATE_TIMEOUT = 1200.0              # boot + cloud-init of the template VM, under TCG
SAVE_TIMEOUT = 600.0
RESTORE_TIMEOUT = 300.0
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
                                 f"{_console_tail(vm)}")
            if vm.boot_progress()["cloud_init"] == "done" and await vm.check_ssh():
                return
            if time.monotonic() > deadline:
                raise Timeout(f"template {vm.name}: not booted (SSH and cloud-init) in time; "
                              f"console: {_console_tail(vm)}")
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

    # --- warm create ---

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
                                 f"{_console_tail(vm)}", template=tpl.name)
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


def _console_tail(vm: VM, n: int = 400) -> str:
    try:
        data = (vm.run_dir / qargv.CONSOLE_LOG).read_bytes()[-n:]
    except OSError:
        return "(no console log)"
    return data.decode("utf-8", "replace").strip().replace("\r", "")
