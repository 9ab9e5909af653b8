"""Build the qemu-system-x86_64 command line (pure: data in, list of strings out).

The argv is a list, never a shell string; it is saved as ``argv.json`` in the run dir and
returned by a dry run. Socket paths are relative to the run dir (qemu is started with the
run dir as its working directory; unix socket paths are limited to 107 bytes), every other
path is absolute, and ``-pidfile`` names the run dir so that re-adoption can check that a
running pid is this VM's qemu.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmagent.rundir import (CONSOLE_LOG, CONSOLE_SOCK, DISK, PIDFILE, QGA_SOCK,
                            QMP_OPERATOR_SOCK, QMP_SOCK, SEED, VNC_SOCK)

QEMU_BINARY = "qemu-system-x86_64"

# Block node of the instance disk (live snapshots name it); the drive's id is "disk0".
DISK_NODE = "hd0"
# The seed CD's device id (its medium is changed by push_config while running).
SEED_DEVICE = "cd0"

# seccomp: deny what a VM never needs, but keep what -daemonize does. Measured with qemu
# 7.2: spawn=deny kills the daemonizing fork() with SIGSYS, and elevateprivileges=deny
# makes its setsid() fail, so qemu exits 1 without a word. Both are left out.
SANDBOX = "on,obsolete=deny,resourcecontrol=deny"

# TCG's buffer of translated code, in MiB. qemu 7.2's default is 1 GiB, and a guest
# that runs much code fills it (measured: 1016 MiB resident after a boot and a
# workload, docs/allocation.md), so qemu's memory beyond the guest's RAM would reach
# 1.2 GiB; capped, it is bounded and fits under a VM's ram_limit
# (vmagent/alloc/sizing.py counts it in qemu's overhead under TCG).
TCG_TB_MIB = 256

# The device model a VM runs with, kept for its whole life (rt.device_model): a saved
# state (a template's, a live snapshot's) loads only into the CPU model and devices
# that saved it, so a change of the defaults applies to new VMs and templates only.
#   1: -cpu max under TCG (records and templates without a model ran with it)
#   2: under TCG the CPU model qemu emulates cheapest, its default qemu64: ``max``
#      turns on every feature TCG can emulate (5-level paging, AVX-era extensions...),
#      which the guest's kernel then uses, at a cost in every page walk and context
#      switch (docs/performance.md: the cold boot's phases).
# Under KVM both are ``-cpu host``.
LEGACY_MODEL = 1
DEVICE_MODEL = 2
TCG_CPU = {1: "max", 2: "qemu64"}


def cpu_model(accel: str, model: int = DEVICE_MODEL) -> str:
    """The ``-cpu`` of a VM of device model ``model`` under ``accel``."""
    if accel == "kvm":
        return "host"
    if accel != "tcg":
        raise ValueError(f"unknown accel {accel!r}")
    if model not in TCG_CPU:
        raise ValueError(f"unknown device model {model!r}")
    return TCG_CPU[model]


def model_of(argv: list[str]) -> int:
    """The device model a saved command line (a template's) ran with: the first one
    when it names no CPU (made before models), the current one under KVM (where the
    models do not differ)."""
    cpu = next((b for a, b in zip(argv, argv[1:]) if a == "-cpu"), None)
    if cpu is None:
        return LEGACY_MODEL
    return {v: k for k, v in TCG_CPU.items()}.get(cpu, DEVICE_MODEL)


@dataclass(frozen=True)
class KernelBoot:
    kernel: str
    initrd: str | None = None
    append: str | None = None


@dataclass(frozen=True)
class MachineConfig:
    """Everything the command line depends on, resolved by the caller."""

    name: str
    run_dir: Path
    cpus: int
    memory: int            # bytes
    accel: str             # "kvm" or "tcg"
    ssh_port: int
    mac: str
    vmgenid: str           # a UUID; changed when a guest must reseed (restore, clone)
    disk: Path | None = None   # defaults to run_dir/disk.qcow2
    seed: Path | None = None   # defaults to run_dir/seed.iso
    kernel_boot: KernelBoot | None = None
    qemu_binary: str = QEMU_BINARY
    sandbox: bool = True
    model: int = DEVICE_MODEL      # see DEVICE_MODEL


def build_argv(cfg: MachineConfig) -> list[str]:
    run = Path(cfg.run_dir).resolve()
    disk = Path(cfg.disk).resolve() if cfg.disk else run / DISK
    seed = Path(cfg.seed).resolve() if cfg.seed else run / SEED
    cpu = cpu_model(cfg.accel, cfg.model)
    accel = (["-accel", "kvm"] if cfg.accel == "kvm"
             else ["-accel", f"tcg,thread=multi,tb-size={TCG_TB_MIB}"])
    argv = [
        cfg.qemu_binary,
        "-name", f"{cfg.name},debug-threads=on",
        "-machine", "q35",
        *accel,
        "-cpu", cpu,
        "-smp", str(cfg.cpus),
        "-m", f"{cfg.memory // (1 << 20)}M",
        "-nodefaults", "-no-user-config",
        "-daemonize", "-pidfile", str(run / PIDFILE),
        "-chardev", f"socket,id=qmp,path={QMP_SOCK},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=qmpop,path={QMP_OPERATOR_SOCK},server=on,wait=off",
        "-mon", "chardev=qmpop,mode=control",
        "-chardev", (f"socket,id=serial0,path={CONSOLE_SOCK},server=on,wait=off,"
                     f"logfile={run / CONSOLE_LOG},logappend=on"),
        "-serial", "chardev:serial0",
        # the screen behind VNC (vmctl vnc, the web UI's console): the guest drives it in
        # VGA text mode (vgacon; the cloud kernels have no DRM driver that a cheaper
        # device such as bochs-display would need, so they would show nothing): no
        # framebuffer to draw, and qemu renders only while a VNC client is connected
        "-device", "VGA",
        "-display", "none",
        "-vnc", f"unix:{VNC_SOCK}",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={QGA_SOCK},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        "-device", f"vmgenid,id=vmgenid0,guid={cfg.vmgenid}",
        "-device", "virtio-rng-pci",
        "-device", "pvpanic",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{cfg.ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev=net0,mac={cfg.mac}",
        "-drive", f"file={_drive_path(disk)},if=none,id=disk0,"
                  f"node-name={DISK_NODE},format=qcow2,"
                  "cache=writeback,discard=unmap",
        "-device", "virtio-blk-pci,drive=disk0,id=vda,bootindex=1",
        "-drive", f"file={_drive_path(seed)},if=none,id=seed0,format=raw,media=cdrom,"
                  "readonly=on",
        # virtio-scsi, not ide-cd: cloud kernels (the test image's) have no AHCI driver;
        # a CD keeps a removable medium so push_config can swap the seed while running
        "-device", "virtio-scsi-pci,id=scsi0",
        "-device", f"scsi-cd,bus=scsi0.0,drive=seed0,id={SEED_DEVICE}",
        "-rtc", "base=utc",
        "-msg", "timestamp=on",
    ]
    if cfg.kernel_boot:
        argv += ["-kernel", cfg.kernel_boot.kernel]
        if cfg.kernel_boot.initrd:
            argv += ["-initrd", cfg.kernel_boot.initrd]
        if cfg.kernel_boot.append:
            argv += ["-append", cfg.kernel_boot.append]
    if cfg.sandbox:
        argv += ["-sandbox", SANDBOX]
    return argv


def _drive_path(path: Path) -> str:
    """-drive uses ',' as separator: a literal comma in a path is written ',,'."""
    return str(path).replace(",", ",,")


def owns_cmdline(cmdline: list[str], run_dir: Path) -> bool:
    """Whether a process command line is the qemu of the VM in ``run_dir``."""
    if not cmdline or "qemu-system" not in Path(cmdline[0]).name:
        return False
    pidfile = str(Path(run_dir).resolve() / PIDFILE)
    return any(a == "-pidfile" and b == pidfile for a, b in zip(cmdline, cmdline[1:]))
