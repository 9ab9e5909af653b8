"""Turning a VM's spec and runtime, its image and the host's accelerator into a running
qemu: the argv (pure, :mod:`vmagent.qemu.argv`), the disk grown to the spec, the SSH
port forward (another port when the chosen one was taken meanwhile), the state
transitions of a start; with an allocator (:mod:`vmagent.alloc.service`), qemu starts
inside the VM's cgroup, with its GPUs."""

from __future__ import annotations

import logging
import random
import socket
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

from vmagent.errors import Conflict, VMLaunchFailure
from vmagent.images.store import Image, ImageStore
from vmagent.qemu import argv as qargv
from vmagent.qemu import disks
from vmagent.qemu.host import QemuHost
from vmagent import faults, rundir
from vmagent.vms.registry import VMRegistry
from vmagent.vms.state import State
from vmagent.vms.store import VMRecord
from vmagent.vms.vm import VM

if TYPE_CHECKING:                     # pragma: no cover
    from vmagent.alloc.service import Allocator

log = logging.getLogger(__name__)

PORT_RANGE = (20000, 30000)
LAUNCH_ATTEMPTS = 5

# a warm start's step between qemu's start and the VM counting as running
Restore = Callable[[VM], Awaitable[None]]


class PortAllocator:
    """Free loopback ports for the VMs' SSH forwards, none used by another VM."""

    def __init__(self, used: Callable[[], Iterable[int | None]],
                 port_range: tuple[int, int] = PORT_RANGE) -> None:
        self.used = used
        self.range = port_range

    def allocate(self, avoid: int | None = None) -> int:
        taken = set(self.used()) | {avoid}
        for _ in range(200):
            port = random.randrange(*self.range)
            if port in taken:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise Conflict("no free port for SSH forwarding in "
                       f"{self.range[0]}-{self.range[1] - 1}")


def machine_config(rec: VMRecord, image: Image, host: QemuHost) -> qargv.MachineConfig:
    kernel = None
    if image.boot == "kernel" and image.kernel:
        kernel = qargv.KernelBoot(str(image.kernel),
                                  str(image.initrd) if image.initrd else None, image.append)
    return qargv.MachineConfig(
        name=rec.name, run_dir=rec.run_dir, cpus=rec.spec.cpus, memory=rec.spec.memory,
        accel=host.accel_name, ssh_port=rec.rt.ssh_port, mac=rec.rt.mac,
        vmgenid=rec.rt.vmgenid, kernel_boot=kernel, qemu_binary=host.binary,
        sandbox=host.sandbox, model=rec.rt.device_model)


class Launcher:
    def __init__(self, registry: VMRegistry, images: ImageStore, host: QemuHost,
                 ports: PortAllocator, alloc: Allocator | None = None) -> None:
        self.registry = registry
        self.images = images
        self.host = host
        self.ports = ports
        self.alloc = alloc

    def argv(self, rec: VMRecord, image: Image, extra: Iterable[str] = ()) -> list[str]:
        return qargv.build_argv(machine_config(rec, image, self.host)) + list(extra)

    async def launch(self, vm: VM, extra_argv: Iterable[str] = (),
                     restore: Restore | None = None) -> None:
        """Start qemu (from stopped or broken; from running for a hard reset, whose
        qemu is gone already). ``extra_argv`` is appended to the argv, and
        ``restore(vm)`` runs once qemu is up, before the VM counts as running (a warm
        start loads its template's state there). A failed start leaves it stopped with
        the reason."""
        rec, rt = vm.rec, vm.rec.rt
        image = self.images.resolve(rec.spec.image)
        disk = vm.run_dir / rundir.DISK
        info = await disks.qemu_img_info(disk)
        if rec.spec.disk > info["virtual-size"]:
            await disks.resize(disk, rec.spec.disk)
        rundir.clear_runtime(vm.run_dir)      # no pidfile: qemu has not run (yet)
        # the VM's cgroup (with its limits) and GPUs, before qemu runs
        prefix, devices = self.alloc.prepare(vm) if self.alloc else ([], [])
        self.registry.transition(vm, State.STARTING)
        faults.point("start.starting")
        for attempt in range(LAUNCH_ATTEMPTS):
            argv = self.argv(rec, image, [*extra_argv, *devices])
            self.registry.store.save_argv(rec, argv)
            try:
                await vm.launch(argv, prefix)
                if self.alloc:
                    self.alloc.started(vm)
                if restore is not None:
                    await restore(vm)
                break
            except VMLaunchFailure as e:
                if ("hostfwd" in e.output or "host forwarding" in e.output) \
                        and attempt + 1 < LAUNCH_ATTEMPTS:
                    log.info("%s: port %s taken; trying another", vm.name, rt.ssh_port)
                    rt.ssh_port = self.ports.allocate(avoid=rt.ssh_port)
                    continue
                self.registry.transition(vm, State.STOPPED, e.message, started_at=None)
                raise
            except BaseException as e:
                if vm.machine.alive():
                    await vm.quit()
                await vm.detach()
                self.registry.transition(vm, State.STOPPED, f"start failed: "
                                         f"{getattr(e, 'message', None) or e!r}",
                                         started_at=None)
                raise
        self.registry.transition(vm, State.RUNNING, accel=self.host.accel_name,
                                 started_at=time.time(), config_pending=False)
