"""What this host's qemu is: the binary, its version, seccomp, and the accelerator the
agent chose (:mod:`vmagent.qemu.accel`). One instance is shared by every service that
starts qemu; the accelerator may change once after start-up (the first image with a
kernel makes the KVM probe possible)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vmagent.qemu.accel import AccelChoice, choose, qemu_version
from vmagent.qemu.argv import QEMU_BINARY


@dataclass
class QemuHost:
    binary: str = QEMU_BINARY
    sandbox: bool = True
    accel_override: str | None = None        # "kvm"/"tcg": the probe is skipped
    accel: AccelChoice | None = None
    version: str = field(default="")

    def __post_init__(self) -> None:
        if not self.version:
            self.version = qemu_version(self.binary)

    @property
    def accel_name(self) -> str:
        return self.accel.name if self.accel else "tcg"

    async def choose_accel(self, state_dir: Path, kernels: list[Path]) -> AccelChoice:
        self.accel = await choose(state_dir, kernels, override=self.accel_override,
                                  binary=self.binary)
        return self.accel

    async def new_kernel(self, state_dir: Path, kernel: Path) -> None:
        """A kernel arrived (an image import): verify KVM with it if nothing could yet."""
        if self.accel is not None and not self.accel.probed and not self.accel_override:
            await self.choose_accel(state_dir, [kernel])
