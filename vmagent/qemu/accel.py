"""Choose the accelerator: KVM only if it really runs a guest, TCG otherwise.

Opening /dev/kvm proves little: on some hosts (nested PVM) it opens and guests then hang
at early boot. The probe boots a real Linux kernel under ``-accel kvm`` with no root
device: a working KVM gets it to "VFS: Unable to mount root fs" (a panic, and with
``panic=-1 -no-reboot`` qemu exits) within seconds; a broken one prints nothing or stops
mid-way. The result is cached in the state dir keyed by the qemu binary's version and the
kernel's digest, so the probe runs once per host, not per agent start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmagent.fsutil import atomic_write_json, read_json, sha256_file

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 20.0
_REACHED = (b"VFS: Unable to mount root", b"Kernel panic", b"Run /init")


@dataclass
class AccelChoice:
    name: str                 # "kvm" or "tcg"
    reason: str
    probed: bool              # a probe ran (now or cached) rather than an override
    probe_seconds: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return out.splitlines()[0].removeprefix("QEMU emulator version ").strip() if out else ""


def probe_argv(kernel: Path, binary: str = "qemu-system-x86_64") -> list[str]:
    return [binary, "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256M",
            "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"]


async def probe_kvm(kernel: Path, binary: str = "qemu-system-x86_64",
                    timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM until it panics for lack of a root fs."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *probe_argv(kernel, binary), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    seen = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await proc.stdout.read(65536):
                seen = (seen + chunk)[-8192:]
                if any(m in seen for m in _REACHED):
                    return True, (f"KVM booted a test kernel in "
                                  f"{time.monotonic() - start:.1f}s")
    except TimeoutError:
        return False, (f"/dev/kvm is present but a test kernel did not boot under KVM "
                       f"within {timeout:g}s (e.g. nested PVM); using TCG")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    last = seen.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
    return False, f"KVM probe: qemu exited ({proc.returncode}) before the kernel ran: {last[0]}"


async def choose(state_dir: Path, kernels: list[Path], *, override: str | None = None,
                 binary: str = "qemu-system-x86_64") -> AccelChoice:
    if override in ("kvm", "tcg"):
        return AccelChoice(override, f"set by configuration ({override})", False)
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "no /dev/kvm on this host", False)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "/dev/kvm is not accessible to the agent", False)
    kernel = next((k for k in kernels if k.is_file()), None)
    if kernel is None:
        return AccelChoice("tcg", "/dev/kvm exists but there is no kernel to verify that "
                           "it runs a guest (import an image with a kernel, or pass "
                           "--probe-kernel); using TCG", False)
    key = {"qemu": qemu_version(binary), "kernel_sha256": sha256_file(kernel)}
    cache = Path(state_dir) / "accel.json"
    try:
        cached = read_json(cache)
        if cached.get("key") == key:
            return AccelChoice(**cached["choice"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass                  # no cache, or not the shape we write: probe again
    start = time.monotonic()
    ok, reason = await probe_kvm(kernel, binary)
    choice = AccelChoice("kvm" if ok else "tcg", reason, True,
                         round(time.monotonic() - start, 2))
    log.info("accel: %s (%s)", choice.name, choice.reason)
    atomic_write_json(cache, {"key": key, "choice": choice.to_json()})
    return choice
