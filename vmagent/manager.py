"""The agent's operations: one ``op_<name>`` coroutine per row of ``ops.OPERATIONS``.

Operations marked ``lock`` in the table run under the VM's lock (the server takes it),
so operations on one VM are serialized and different VMs proceed in parallel. Every state
change is written atomically to the VM's ``state.json`` before the operation returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from vmagent import __version__

from vmagent.qemu import disks

from vmagent.identity import hostkeys

from vmagent.identity import seed
from vmagent.qemu import argv as qargv
from vmagent.qemu.accel import AccelChoice, qemu_version
from vmagent.images.build.jobs import Builds
from vmagent.images.catalog import Catalog
from vmagent.errors import BadRequest, Conflict, NotFound, VMAgentError, VMLaunchFailure
from vmagent.images.store import Image, ImageStore
from vmagent.spec import Defaults, VMSpec, apply_defaults, check_name
from vmagent.spec import parse_flag as _flag
from vmagent.vms.store import State, Store, VMRecord, Runtime, now_iso
from vmagent.templates.warm import CloneOps
from vmagent.images.service import ImageOps
from vmagent.vms.lifecycle import LifecycleOps
from vmagent.templates.service import TemplateOps
from vmagent.vms.vm import VM
from vmagent.vms.watcher import vm_status

log = logging.getLogger(__name__)

PORT_RANGE = (20000, 30000)
LAUNCH_ATTEMPTS = 5


@dataclass
class Settings:
    state_dir: Path
    catalog: Catalog
    defaults: Defaults = field(default_factory=Defaults)
    qemu_binary: str = qargv.QEMU_BINARY
    lock_wait: float = 600.0          # how long an operation waits for a busy VM
    shutdown_timeout: float = 60.0
    reboot_timeout: float = 60.0
    sandbox: bool = True
    accel_override: str | None = None  # "kvm"/"tcg": skip the probe


class Manager(TemplateOps, CloneOps, LifecycleOps, ImageOps):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.state_dir)
        self.images = ImageStore(settings.state_dir / "images", settings.catalog)
        self.builds = Builds(settings.state_dir, self.images, settings.catalog)
        self.vms: dict[str, VM] = {}
        self.accel: AccelChoice | None = None
        self.qemu_version = qemu_version(settings.qemu_binary)
        self._name_locks: dict[str, asyncio.Lock] = {}

    # --- startup: re-adopt what runs --------------------------------------------------

    async def adopt(self) -> None:
        for name in self.store.names():
            try:
                vm = VM(self.store.load(name))
            except VMAgentError as e:
                log.error("%s", e)
                continue
            self.vms[name] = vm
            await self.reconcile(vm)

    async def reconcile(self, vm: VM) -> None:
        """Make the recorded state agree with the process table."""
        rt = vm.rec.rt
        if vm.machine.alive():
            try:
                await vm.attach()
            except VMAgentError as e:
                log.warning("%s: qemu runs but QMP does not answer: %s", vm.name, e)
            if rt.state != State.RUNNING:
                rt.state, rt.reason = State.RUNNING, None
                self.store.save_state(vm.rec)
            log.info("%s: adopted running qemu pid %s", vm.name, vm.machine.pid())
        elif rt.state in (State.RUNNING, State.STARTING, State.STOPPING):
            await self._mark_gone(vm)

    async def _mark_gone(self, vm: VM) -> None:
        rt = vm.rec.rt
        await vm.detach()
        if vm.last_event == "GUEST_PANICKED" or rt.reason == "the guest kernel panicked":
            rt.state, rt.reason = State.BROKEN, "the guest kernel panicked"
        elif vm.last_event == "SHUTDOWN" or vm.powered_down() or rt.state == State.STOPPING:
            rt.state, rt.reason = State.STOPPED, None
        else:
            rt.state = State.BROKEN
            rt.reason = "qemu exited unexpectedly (see the console log)"
        rt.started_at = None
        log.warning("%s: qemu is gone; now %s", vm.name, rt.state.value)
        self.store.save_state(vm.rec)

    # --- locking ----------------------------------------------------------------------

    def get(self, name: str) -> VM:
        check_name(name)
        vm = self.vms.get(name)
        if vm is None:
            raise NotFound(f"no VM named {name!r}", vm=name)
        return vm

    @contextlib.asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[None]:
        """The VM's operation lock (or the name's, while the VM is being created)."""
        check_name(name)
        lock = self.vms[name].lock if name in self.vms else \
            self._name_locks.setdefault(name, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), self.settings.lock_wait)
        except asyncio.TimeoutError:
            raise Conflict(f"VM {name} is busy with another operation; gave up after "
                           f"{self.settings.lock_wait:g}s") from None
        try:
            yield
        finally:
            lock.release()

    # --- reading ----------------------------------------------------------------------

    async def op_host(self) -> dict:
        from vmagent.vms.watcher import host_capacity
        running = [v for v in self.vms.values() if v.rec.rt.state == State.RUNNING]
        return {"version": __version__, "accel": self.accel.to_json() if self.accel else None,
                "qemu_version": self.qemu_version,
                "capacity": host_capacity(self.settings.state_dir),
                "allocated": {"cpus": sum(v.rec.spec.cpus or 0 for v in running),
                              "memory": sum(v.rec.spec.memory or 0 for v in running)},
                "vms": {"total": len(self.vms), "running": len(running)},
                "state_dir": str(self.settings.state_dir)}

    async def op_list(self) -> dict:
        return {"vms": [vm_status(v, probe=False) for _, v in sorted(self.vms.items())]}

    async def op_status(self, name: str) -> dict:
        return vm_status(self.get(name))

    async def op_console_log(self, name: str, offset: Any = 0, tail: Any = None) -> dict:
        vm = self.get(name)
        size = vm.console_size()
        try:
            offset = int(offset or 0)
            tail = None if tail in (None, "") else int(tail)
        except (TypeError, ValueError):
            raise BadRequest("offset and tail must be whole numbers") from None
        if offset < 0 or (tail is not None and tail < 0):
            raise BadRequest("offset and tail must not be negative")
        if tail is not None:
            offset = max(0, size - tail)
        offset = min(offset, size)
        try:
            with open(vm.run_dir / qargv.CONSOLE_LOG, "rb") as f:
                f.seek(offset)
                data = f.read(1 << 20)
        except FileNotFoundError:
            data = b""
        return {"offset": offset + len(data), "size": size,
                "data": data.decode("utf-8", "replace")}

    # --- create / delete / config -----------------------------------------------------

    async def op_create(self, dry_run: Any = False, start: Any = True,
                        template: Any = None, **fields: Any) -> dict:
        dry_run, start = _flag(dry_run, "dry_run"), _flag(start, "start")
        if template not in (None, ""):
            # a warm start from a template's saved state (templates.py)
            return await self._warm_create(template, bool(dry_run), bool(start), fields)
        spec = VMSpec.from_dict(fields)
        if spec.name in self.vms:
            raise Conflict(f"a VM named {spec.name!r} already exists", vm=spec.name)
        # the whole spec is checked before anything slow (an image pull) happens
        dataclasses.replace(spec, segment=spec.segment or
                            self.settings.defaults.segment).check_allocation()
        image = await self._image_for(spec.image or self.settings.defaults.image,
                                      pull=not dry_run)
        spec = apply_defaults(spec, self.settings.defaults, image.virtual_size)
        rt = self._new_runtime(spec.name)
        keys = hostkeys.for_vm(spec.name, image.cloud_config, spec.extra_cloud_config(),
                               dry_run=dry_run)
        files = seed.render_seed(spec, rt.instance_id, rt.mac, image.cloud_config, keys)
        if dry_run:
            return self._dry_run(spec, rt, image, files)
        rec = await self._stage(spec, rt, image.path, image.format, files,
                                keys and (lambda run_dir: hostkeys.save(run_dir, keys)))
        vm = await self._add(rec, start)
        return vm_status(vm)

    def _new_runtime(self, name: str, mac: str | None = None) -> Runtime:
        return Runtime(state=State.STOPPED, mac=mac or _random_mac(),
                       vmgenid=str(uuid.uuid4()), instance_id=seed.new_instance_id(name),
                       created=now_iso(), ssh_port=self._free_port())

    def _dry_run(self, spec: VMSpec, rt: Runtime, image: Image, files: dict[str, bytes],
                 extra_argv: tuple[str, ...] = (), **more: Any) -> dict:
        rec = VMRecord(spec.name, self.store.run_dir(spec.name), spec, rt)
        return {"dry_run": True, "spec": spec.to_dict(), "image": image.name, **more,
                "argv": self._argv(rec, image) + list(extra_argv),
                "seed": {k: v.decode() for k, v in files.items()}}

    async def _stage(self, spec: VMSpec, rt: Runtime, base: Path, base_format: str,
                     files: dict[str, bytes],
                     extra: Callable[[Path], None] | None = None) -> VMRecord:
        """Build the run dir (overlay, seed, spec, state; ``extra(dir)`` adds more) in a
        staging dir that becomes the VM's with one rename; nothing is left on failure."""
        staging = self.store.new_dir(spec.name)
        try:
            await disks.create_overlay(base, base_format, staging / qargv.DISK, spec.disk)
            seed.write_seed_iso(staging / qargv.SEED, files)
            if extra is not None:
                extra(staging)
            rec = VMRecord(spec.name, staging, spec, rt)
            self.store.save_spec(rec)
            self.store.save_state(rec)
            rec.run_dir = self.store.commit_new(staging, spec.name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return rec

    async def _add(self, rec: VMRecord, start: bool = True, **launch: Any) -> VM:
        """Register a staged VM and start it (``launch``: arguments of ``_launch``). A VM
        that cannot start is not half-created: it is not created at all."""
        vm = self.vms[rec.name] = VM(rec)
        vm.lock = self._name_locks.pop(rec.name, vm.lock)
        if start:
            try:
                await self._launch(vm, **launch)
            except BaseException:
                with contextlib.suppress(Exception):
                    await vm.quit()
                del self.vms[rec.name]
                self.store.remove(rec.name)
                raise
        return vm

    async def _image_for(self, name: str, pull: bool) -> Image:
        if pull and not self.images.exists(name) and name in self.images.catalog:
            log.info("image %s is not in the store; pulling it", name)
            await self.images.pull(name)
        return self.images.resolve(name)

    async def op_delete(self, name: str) -> dict:
        vm = self.get(name)
        vm.rec.rt.state = State.DELETING
        self.store.save_state(vm.rec)
        if vm.machine.alive():
            await vm.quit()
        await vm.detach()
        self.store.remove(name)
        del self.vms[name]
        return {"deleted": name}

    async def op_push_config(self, name: str, **fields: Any) -> dict:
        vm = self.get(name)
        old = vm.rec.spec
        if "name" in fields and fields["name"] != name:
            raise BadRequest("a VM cannot be renamed")
        merged = {**old.to_dict(), **{k: v for k, v in fields.items()}}
        spec = VMSpec.from_dict(merged)
        if spec.image != old.image:
            raise BadRequest(f"the image of {name} cannot change ({old.image} -> "
                             f"{spec.image}); create a new VM")
        image = self.images.resolve(spec.image)
        spec = apply_defaults(spec, self.settings.defaults, image.virtual_size)
        if spec.disk < old.disk:
            raise BadRequest(f"disk: {spec.disk} bytes is smaller than the current "
                             f"{old.disk}; a disk can only grow")
        rt = vm.rec.rt
        instance_id = seed.new_instance_id(name)
        # the VM keeps its host keys, unless the new user-data handles them itself
        keys = hostkeys.load(vm.run_dir)
        if keys and hostkeys.overridden(image.cloud_config, spec.extra_cloud_config()):
            keys = None
        files = seed.render_seed(spec, instance_id, rt.mac, image.cloud_config, keys)
        tmp = vm.run_dir / (qargv.SEED + ".new")
        seed.write_seed_iso(tmp, files)
        os.replace(tmp, vm.run_dir / qargv.SEED)
        if keys is None:
            (vm.run_dir / hostkeys.FILE).unlink(missing_ok=True)
            vm.host_keys = None
        vm.rec.spec, rt.instance_id = spec, instance_id
        self.store.save_spec(vm.rec)
        if rt.state == State.RUNNING:
            rt.config_pending = True
            # the guest locks the tray of a mounted CD: force the swap, so that a guest
            # reboot (not only a cold start) sees the new seed
            try:
                await vm.qmp("blockdev-change-medium", {
                    "id": qargv.SEED_DEVICE, "filename": str(vm.run_dir / qargv.SEED),
                    "format": "raw", "read-only-mode": "read-only", "force": True})
            except VMAgentError as e:
                log.warning("%s: seed swap failed (%s); the new config is used at the "
                            "next start", name, e)
        self.store.save_state(vm.rec)
        return vm_status(vm)

    # --- lifecycle ----------------------------------------------------------------------

    def _argv(self, rec: VMRecord, image: Image) -> list[str]:
        kernel = None
        if image.boot == "kernel" and image.kernel:
            kernel = qargv.KernelBoot(str(image.kernel),
                                      str(image.initrd) if image.initrd else None,
                                      image.append)
        cfg = qargv.MachineConfig(
            name=rec.name, run_dir=rec.run_dir, cpus=rec.spec.cpus,
            memory=rec.spec.memory, accel=self.accel.name if self.accel else "tcg",
            ssh_port=rec.rt.ssh_port, mac=rec.rt.mac, vmgenid=rec.rt.vmgenid,
            kernel_boot=kernel, qemu_binary=self.settings.qemu_binary,
            sandbox=self.settings.sandbox)
        return qargv.build_argv(cfg)

    def _free_port(self, avoid: int | None = None) -> int:
        used = {v.rec.rt.ssh_port for v in self.vms.values()} | {avoid}
        for _ in range(200):
            port = random.randrange(*PORT_RANGE)
            if port in used:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise Conflict("no free port for SSH forwarding in "
                       f"{PORT_RANGE[0]}-{PORT_RANGE[1] - 1}")

    async def _launch(self, vm: VM, extra_argv: list[str] | None = None,
                      restore: Any = None) -> None:
        """Start qemu. ``extra_argv`` is appended to the argv, and ``restore(vm)`` (a
        coroutine function) runs once qemu is up, before the VM counts as running (a warm
        start loads its template's state there)."""
        rec, rt = vm.rec, vm.rec.rt
        image = self.images.resolve(rec.spec.image)
        info = await disks.qemu_img_info(vm.run_dir / qargv.DISK)
        if rec.spec.disk > info["virtual-size"]:
            await disks.resize(vm.run_dir / qargv.DISK, rec.spec.disk)
        rt.state, rt.reason = State.STARTING, None
        self.store.save_state(rec)
        for attempt in range(LAUNCH_ATTEMPTS):
            argv = self._argv(rec, image) + list(extra_argv or ())
            self.store.save_argv(rec, argv)
            try:
                await vm.launch(argv)
                if restore is not None:
                    await restore(vm)
                break
            except VMLaunchFailure as e:
                if "hostfwd" in e.output or "host forwarding" in e.output:
                    if attempt + 1 < LAUNCH_ATTEMPTS:
                        log.info("%s: port %s taken; trying another", vm.name, rt.ssh_port)
                        rt.ssh_port = self._free_port(avoid=rt.ssh_port)
                        continue
                rt.state, rt.reason = State.STOPPED, e.message
                self.store.save_state(rec)
                raise
            except BaseException as e:
                if vm.machine.alive():
                    await vm.quit()
                rt.state, rt.reason = State.STOPPED, f"start failed: {e}"
                self.store.save_state(rec)
                raise
        rt.state, rt.accel, rt.started_at = State.RUNNING, self.accel.name if self.accel \
            else "tcg", time.time()
        rt.config_pending = False
        self.store.save_state(rec)


def _random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))
