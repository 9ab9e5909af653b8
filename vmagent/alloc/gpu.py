"""The host's GPUs for segment ``gpu-dev``: PCI devices listed in the agent's config,
bound to the ``vfio-pci`` driver, passed through whole to one running VM each with
qemu's ``-device vfio-pci,host=ADDRESS``.

A VM holds a *number* of GPUs from its creation to its deletion (the ledger counts
them like its other guarantees); which devices it gets is chosen when it starts: the
ones it had before if they are free, else any free ones. Binding a device to vfio-pci
is the host's setup (docs/allocation.md); a device that is not bound, or whose IOMMU
group has no ``/dev/vfio`` node, is reported and not handed out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from vmagent.alloc.config import GPU
from vmagent.errors import Conflict

VFIO_DRIVER = "vfio-pci"


@dataclass(frozen=True)
class Sysfs:
    """Where the kernel shows PCI devices and VFIO groups (a test points it elsewhere)."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")

    def device(self, address: str) -> Path:
        return self.sys / "bus" / "pci" / "devices" / address


def check(gpu: GPU, fs: Sysfs = Sysfs()) -> dict[str, Any]:
    """The device's state: present, its driver and IOMMU group, and whether it can be
    passed through (``ready``; otherwise ``problem`` says why)."""
    dev = fs.device(gpu.address)
    out: dict[str, Any] = {"address": gpu.address, "label": gpu.label, "driver": None,
                           "iommu_group": None, "ready": False, "problem": None}
    if not dev.exists():
        out["problem"] = f"no PCI device {gpu.address} on this host"
        return out
    driver = dev / "driver"
    out["driver"] = os.path.basename(os.readlink(driver)) if driver.is_symlink() else None
    group = dev / "iommu_group"
    if group.is_symlink():
        out["iommu_group"] = os.path.basename(os.readlink(group))
    if out["driver"] != VFIO_DRIVER:
        out["problem"] = (f"{gpu.address} is bound to {out['driver'] or 'no driver'}, not "
                          f"{VFIO_DRIVER}")
    elif out["iommu_group"] is None:
        out["problem"] = f"{gpu.address} has no IOMMU group (is the IOMMU enabled?)"
    elif not (fs.dev / "vfio" / out["iommu_group"]).exists():
        out["problem"] = f"/dev/vfio/{out['iommu_group']} does not exist"
    else:
        out["ready"] = True
    return out


def pick(gpus: Iterable[GPU], busy: set[str], count: int, prefer: Iterable[str] = (),
         fs: Sysfs = Sysfs(), vm: str = "", host: str = "") -> list[str]:
    """``count`` devices for a VM that starts: those it prefers first, among the
    ready ones no running VM has. Conflict if there are not enough."""
    if count <= 0:
        return []
    ready, problems = [], []
    for g in gpus:
        if g.address in busy:
            continue
        state = check(g, fs)
        (ready if state["ready"] else problems).append(state)
    addresses = [s["address"] for s in ready]
    preferred = [a for a in prefer if a in addresses]
    chosen = (preferred + [a for a in addresses if a not in preferred])[:count]
    if len(chosen) < count:
        why = "; ".join(p["problem"] for p in problems) or "the others are in use"
        raise Conflict(f"{vm}: needs {count} GPU(s), {len(chosen)} can be passed through "
                       f"on {host} now ({why})", refused="gpus", vm=vm)
    return chosen


def argv(addresses: Iterable[str]) -> list[str]:
    """qemu's devices for the GPUs (appended to the VM's argv)."""
    out: list[str] = []
    for i, addr in enumerate(addresses):
        out += ["-device", f"{VFIO_DRIVER},host={addr},id=gpu{i}"]
    return out


def in_argv(args: Iterable[str]) -> list[str]:
    """The GPU addresses a qemu command line passes through."""
    found = []
    for a in args:
        if a.startswith(VFIO_DRIVER + ",host="):
            found.append(a.split("host=", 1)[1].split(",", 1)[0])
    return found
