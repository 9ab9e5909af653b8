"""Bake a bootable disk image from a recipe (:mod:`vmagent.recipes`) with debootstrap.

The disk is a sparse raw file with an MBR partition table and one ext4 partition that
fills it. The host kernel need not understand partition tables: the whole disk and the
partition are two loop devices (the second with an offset), the root file system is
mounted from the second, and GRUB (BIOS, ``i386-pc``: qemu boots SeaBIOS) is installed
from inside the image onto the first; its core image finds ``/boot/grub`` by the file
system's UUID. The guest boots its own kernel from its own disk, ``root=UUID=...`` with
the serial console on ttyS0, and Debian's kernel hooks run ``update-grub``, so a kernel
upgrade takes effect at the next boot.

Steps (each logged to ``build.log`` with every command and its output): prepare (host
tools), resolve (the packages against the mirror's lists), disk, debootstrap, packages,
configure, bootloader, cleanup (no SSH host keys, machine-id, logs, apt lists or cloud-init
state), convert (compressed qcow2). Downloaded packages and a tarball of the debootstrap
result are kept in ``cache_dir`` for the next build. Mounts and loop devices are released
whatever happens (:class:`~vmagent.buildsys.Mounts`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from vmagent.images.build import aptindex
from vmagent.images.build.system import ENV, Log, Mounts, StepFailed, mounts_under, release_stale, run, tail
from vmagent.images.build.recipes import Recipe

__all__ = ["STEPS", "Builder", "Log", "StepFailed", "mounts_under", "release_stale", "tail"]

STEPS = ("prepare", "resolve", "disk", "debootstrap", "packages", "configure",
         "bootloader", "cleanup", "convert")
DEBOOTSTRAP_INCLUDE = ("systemd-sysv", "apt-utils")
BASE_FORMAT = "1"                    # bump when what goes into the base tarball changes
PART_START = 2048                    # sectors: 1 MiB, room for GRUB's core image
ROOT_LABEL = "rootfs"                # the root file system's label: root=LABEL=rootfs
HOST_TOOLS = {"debootstrap": "debootstrap", "sfdisk": "fdisk", "mkfs.ext4": "e2fsprogs",
              "qemu-img": "qemu-utils", "losetup": "mount", "fstrim": "util-linux"}
GRUB_DEFAULTS = """\
# written by the vmagent image builder: boot fast, kernel and GRUB on the serial console
GRUB_TIMEOUT=1
GRUB_RECORDFAIL_TIMEOUT=1
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 no_timer_check"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
"""
BUILD_GRUB_CFG = "/etc/default/grub.d/99-vmagent-build.cfg"
# grub_dpkg off: the bootloader step sets grub-pc/install_devices itself (cloud-init's
# module would probe for the disk again at every first boot: 2.6 s under TCG)
CLOUD_CFG = "datasource_list: [ NoCloud, None ]\ngrub_dpkg:\n  enabled: false\n"
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" \
        "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"


class Builder:
    """One build of ``recipe`` (mirror resolved) in ``work``; :meth:`run` returns the
    compressed qcow2. ``on_step(step)`` is called as each step starts. With
    ``boot_files``, the kernel and initrd GRUB boots are also copied out to
    ``boot_files/vmlinuz`` and ``boot_files/initrd.img`` (for ``-kernel``/``-initrd``)."""

    def __init__(self, recipe: Recipe, work: Path, cache_dir: Path, log: Log,
                 on_step: Callable[[str], None] = lambda step: None,
                 boot_files: Path | None = None) -> None:
        self.recipe = recipe
        self.boot_files = boot_files
        self.work = work
        self.cache = cache_dir / recipe.cache_key
        self.log = log
        self.on_step = on_step
        self.root = work / "root"
        self.disk = work / "disk.raw"
        self.mounts = Mounts(log)
        self.loop_disk = self.loop_part = ""
        self.uuid = ""

    def run(self) -> Path:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            for step in STEPS:
                if self.log.cancelled:
                    raise StepFailed(step, "the build was cancelled")
                self.on_step(step)
                self.log.write(f"\n== {step} ({time.strftime('%H:%M:%S')})\n")
                try:
                    getattr(self, f"step_{step}")()
                except StepFailed:
                    raise
                except subprocess.CalledProcessError as exc:
                    if self.log.cancelled:
                        raise StepFailed(step, "the build was cancelled") from None
                    cmd = shlex.join(exc.cmd[3:] if exc.cmd[:1] == ["nice"] else exc.cmd)
                    raise StepFailed(step, f"{cmd[:200]} exited with {exc.returncode}") \
                        from None
                except subprocess.TimeoutExpired as exc:
                    raise StepFailed(step, f"{shlex.join(exc.cmd)[:200]} timed out") \
                        from None
                except (OSError, aptindex.ResolveError) as exc:
                    raise StepFailed(step, str(exc)) from None
            return self.work / "disk.qcow2"
        finally:
            problems = self.mounts.release()
            if problems:
                self.log.write("cleanup problems: " + "; ".join(problems) + "\n")
            self.disk.unlink(missing_ok=True)

    def chroot(self, *argv: str, nice: bool = True, **kw) -> str:
        return run(self.log, ["chroot", str(self.root), *argv], nice=nice, **kw)

    def write(self, path: str, content: str, mode: int = 0o644) -> None:
        target = self.root / path.lstrip("/")
        if not target.parent.resolve().is_relative_to(self.root.resolve()):
            # an absolute symlink in the image (/var/run -> /run) resolves on the host:
            # checked before anything is created, so nothing is written outside the image
            raise StepFailed("configure", f"cannot write {path}: a directory on its way "
                             "is a symlink out of the image; use the real path")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.write_text(content)
        os.chmod(target, mode)

    # --- the steps -------------------------------------------------------------------

    def step_prepare(self) -> None:
        missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not shutil.which(
            tool, path=ENV["PATH"])})
        if missing:
            run(self.log, ["apt-get", "update", "-q"], nice=True)
            run(self.log, ["apt-get", "install", "-y", "-q", *missing], nice=True)
        if not Path(self.recipe.keyring).is_file():
            raise StepFailed("prepare", f"the {self.recipe.distribution} archive keyring "
                             f"{self.recipe.keyring} is not installed on this host "
                             "(it comes with the distribution's keyring package, e.g. "
                             "ubuntu-keyring)")
        for sub in ("debootstrap", "archives/partial", "lists"):
            (self.cache / sub).mkdir(parents=True, exist_ok=True)
        self.log.write(f"recipe: {self.recipe.to_json()}\n")

    def step_resolve(self) -> None:
        self.log.write(aptindex.update(self.recipe, self.cache / "lists"))
        pkgs = aptindex.simulate(self.recipe, self.cache / "lists")
        self.log.write(f"{len(pkgs)} packages resolve: {' '.join(sorted(pkgs))}\n")

    def step_disk(self) -> None:
        size = self.recipe.disk_size
        self.disk.unlink(missing_ok=True)
        with open(self.disk, "wb") as f:
            f.truncate(size)
        run(self.log, ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel",
                       str(self.disk)], stdin=f"label: dos\nstart={PART_START}, "
                       "type=83, bootable\n")
        self.loop_disk = self.mounts.loop(self.disk)
        self.loop_part = self.mounts.loop(self.disk, PART_START * 512,
                                          size - PART_START * 512)
        run(self.log, ["mkfs.ext4", "-q", "-L", ROOT_LABEL, "-E",
                       "lazy_itable_init=0,lazy_journal_init=0", self.loop_part])
        self.uuid = run(self.log, ["blkid", "-s", "UUID", "-o", "value",
                                   self.loop_part], capture=True).strip()
        self.mounts.mount([self.loop_part], self.root)
        self.mounts.root = self.root

    def step_debootstrap(self) -> None:
        """debootstrap, or unpack the tarball of an earlier one with the same inputs (the
        packages step dist-upgrades it, so an old tarball still gives a current image)."""
        r = self.recipe
        argv = ["debootstrap", "--variant=minbase", f"--cache-dir={self.cache / 'debootstrap'}",
                f"--keyring={r.keyring}", f"--components={','.join(r.components)}",
                f"--include={','.join(DEBOOTSTRAP_INCLUDE)}", r.suite, str(self.root),
                r.mirror]
        if r.debootstrap_script:
            argv.append(f"/usr/share/debootstrap/scripts/{r.debootstrap_script}")
        # the inputs of the result, not where it goes: every recipe with the same base
        # (devel and debian-12) shares one tarball
        inputs = [a for a in argv[1:] if a != str(self.root) and not a.startswith(
            "--cache-dir=")] + [BASE_FORMAT]
        key = hashlib.sha256("\0".join(inputs).encode()).hexdigest()[:16]
        base = self.cache / f"base-{key}.tar"
        tar = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]
        if base.is_file():
            self.log.write(f"reusing the debootstrap result {base}\n")
            run(self.log, [*tar, "-C", str(self.root), "-xpf", str(base)], nice=True)
            return
        run(self.log, argv, nice=True)
        part = base.with_suffix(".part")
        run(self.log, [*tar, "-C", str(self.root), "-cf", str(part), "."], nice=True)
        os.replace(part, base)

    def _chroot_mounts(self) -> None:
        m, root = self.mounts, self.root
        m.mount(["-t", "proc", "proc"], root / "proc")
        m.mount(["-t", "sysfs", "sysfs"], root / "sys")
        m.mount(["-t", "tmpfs", "-o", "mode=0755,size=64m", "dev"], root / "dev")
        dev = root / "dev"
        for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7),
                                   ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)):
            os.mknod(dev / name, 0o20666, os.makedev(major, minor))
            os.chmod(dev / name, 0o666)          # not the umask's 0644: apt drops to _apt
        for loopdev in (self.loop_disk, self.loop_part):
            st = os.stat(loopdev)
            os.mknod(dev / Path(loopdev).name, 0o60660, st.st_rdev)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                             ("ptmx", "pts/ptmx")):
            os.symlink(target, dev / name)
        (dev / "disk/by-uuid").mkdir(parents=True)     # update-grub: root=UUID=...
        os.symlink(f"../../{Path(self.loop_part).name}", dev / "disk/by-uuid" / self.uuid)
        m.mount(["-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts"], dev / "pts")
        m.mount(["-t", "tmpfs", "-o", "mode=0755", "run"], root / "run")
        m.mount(["--bind", str(self.cache / "archives")],
                root / "var/cache/apt/archives")

    def step_packages(self) -> None:
        r = self.recipe
        self._chroot_mounts()
        if Path("/etc/resolv.conf").exists():      # name resolution for apt in the chroot
            (self.root / "etc/resolv.conf").unlink(missing_ok=True)
            shutil.copyfile("/etc/resolv.conf", self.root / "etc/resolv.conf")
        self.write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
        self.write("/etc/apt/sources.list", aptindex.sources_list(r, keyring="").replace(
            " [signed-by=]", ""))
        self.write("/etc/apt/apt.conf.d/50vmagent", 'APT::Install-Recommends "false";\n')
        self.write("/etc/default/grub.d/50-vmagent.cfg", GRUB_DEFAULTS)
        self.write("/etc/fstab", f"UUID={self.uuid} / ext4 defaults,errors=remount-ro 0 1\n")
        self.chroot("debconf-set-selections", stdin=(
            "grub-pc grub-pc/install_devices multiselect\n"
            "grub-pc grub-pc/install_devices_empty boolean true\n"))
        self.chroot("apt-get", "update", "-q")
        self.chroot("apt-get", "dist-upgrade", "-y", "-q")
        self.chroot("apt-get", "install", "-y", "-q", *r.all_packages())

    def step_configure(self) -> None:
        self.write("/etc/cloud/cloud.cfg.d/90_vmagent_datasource.cfg", CLOUD_CFG)
        self.write("/etc/hostname", "localhost\n")
        self.write("/etc/hosts", HOSTS)
        for f in self.recipe.files:
            self.log.write(f"write {f.path} (mode {f.mode:04o}, {len(f.content)} bytes)\n")
            self.write(f.path, f.content, f.mode)
        for command in self.recipe.commands:
            self.chroot("/bin/sh", "-ec", command)

    def step_bootloader(self) -> None:
        self.chroot("grub-install", "--target=i386-pc", "--modules=part_msdos ext2",
                    self.loop_disk)
        # grub-mkconfig skips a root on a loop device backed by a file; in the guest the
        # root is /dev/vda1 (the kernel line names it by UUID either way)
        self.write(BUILD_GRUB_CFG, "GRUB_DEVICE=/dev/vda1\n")
        self.chroot("update-grub")
        (self.root / BUILD_GRUB_CFG.lstrip("/")).unlink()
        cfg = (self.root / "boot/grub/grub.cfg").read_text()
        if f"root=UUID={self.uuid}" not in cfg or "console=ttyS0" not in cfg:
            raise StepFailed("bootloader", "grub.cfg does not boot root=UUID=... with "
                             "console=ttyS0 (see the log)")
        # in the guest the disk is /dev/vda: upgrades of grub-pc reinstall it there
        self.chroot("debconf-set-selections", stdin=(
            "grub-pc grub-pc/install_devices multiselect /dev/vda\n"
            "grub-pc grub-pc/install_devices_empty boolean false\n"))
        if self.boot_files is not None:
            self._copy_boot_files(self.boot_files)

    def _copy_boot_files(self, out: Path) -> None:
        """The newest kernel in /boot and its initrd (the ones GRUB boots first)."""
        kernels = sorted(self.root.glob("boot/vmlinuz-*"), key=lambda p: [
            int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)])
        if not kernels:
            raise StepFailed("bootloader", "no kernel in /boot to copy out")
        kernel = kernels[-1]
        initrd = kernel.with_name(kernel.name.replace("vmlinuz-", "initrd.img-", 1))
        if not initrd.is_file():
            raise StepFailed("bootloader", f"no initrd for {kernel.name} in /boot")
        out.mkdir(parents=True, exist_ok=True)
        for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img")):
            self.log.write(f"copy {src.relative_to(self.root)} to {out / name}\n")
            shutil.copyfile(src, out / name)
            os.chmod(out / name, 0o644)

    def step_cleanup(self) -> None:
        root = self.root
        run(self.log, ["umount", str(root / "var/cache/apt/archives")])
        for pattern in ("etc/ssh/ssh_host_*", "var/lib/apt/lists/*", "var/cache/apt/*.bin",
                        "var/cache/apt/archives/*.deb", "var/lib/cloud/*", "tmp/*",
                        "var/tmp/*", "root/.bash_history", "var/lib/dpkg/*-old",
                        "var/cache/debconf/*-old", "var/lib/dbus/machine-id",
                        "etc/resolv.conf", "usr/sbin/policy-rc.d", "var/lib/systemd/random-seed",
                        "var/lib/dhcp/*.leases", "etc/network/interfaces.d/50-cloud-init*"):
            for p in root.glob(pattern):
                self.log.write(f"rm {p.relative_to(root)}\n")
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        for p in (root / "var/log").rglob("*"):
            if p.is_file() or p.is_symlink():
                p.unlink()
        (root / "etc/machine-id").write_text("")           # systemd makes one at boot
        hostkeys = list(root.glob("etc/ssh/ssh_host_*"))
        if hostkeys:
            raise StepFailed("cleanup", f"SSH host keys remain: {hostkeys}")
        run(self.log, ["sync"])
        run(self.log, ["fstrim", "--verbose", str(root)])
        problems = self.mounts.release()
        if problems:
            raise StepFailed("cleanup", "; ".join(problems))

    def step_convert(self) -> None:
        out = self.work / "disk.qcow2"
        out.unlink(missing_ok=True)
        run(self.log, ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
                       "-o", "cluster_size=65536", str(self.disk), str(out)], nice=True)
        run(self.log, ["qemu-img", "info", str(out)])
