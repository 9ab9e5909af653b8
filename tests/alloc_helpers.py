"""Cgroup trees in a temporary directory, laid out like the kernel's (v1: one hierarchy
per controller; v2: one unified hierarchy with cgroup.controllers), and fake sysfs
trees for PCI devices: the allocation code runs on them as on /sys."""

from __future__ import annotations

import os
from pathlib import Path

from vmagent.alloc.config import AgentConfig, Capacity, CgroupConfig, GPU

G = 1 << 30


def v1_tree(root: Path) -> Path:
    """``root/{cpu,cpuacct,memory}`` with the files the backend probes."""
    for ctrl, probe in (("cpu", "cpu.shares"), ("cpuacct", "cpuacct.usage"),
                        ("memory", "memory.limit_in_bytes")):
        (root / ctrl).mkdir(parents=True, exist_ok=True)
        (root / ctrl / probe).write_text("0\n")
    return root


def v2_tree(root: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("\n")
    return root


def pci_device(sys_dir: Path, dev_dir: Path, address: str, driver: str | None = "vfio-pci",
               group: str | None = "42", vfio_node: bool = True) -> None:
    """A PCI device under ``sys_dir/bus/pci/devices`` bound to ``driver``."""
    dev = sys_dir / "bus" / "pci" / "devices" / address
    dev.mkdir(parents=True)
    if driver:
        target = sys_dir / "bus" / "pci" / "drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(target, dev / "driver")
    if group:
        g = sys_dir / "kernel" / "iommu_groups" / group
        g.mkdir(parents=True, exist_ok=True)
        os.symlink(g, dev / "iommu_group")
        if vfio_node:
            (dev_dir / "vfio").mkdir(parents=True, exist_ok=True)
            (dev_dir / "vfio" / group).write_text("")


def config(cg_root: Path, mode: str = "v1", name: str = "host-a", cpus: float = 2,
           memory: int = 4 * G, reserve_cpus: float = 0.5, reserve_memory: int = G,
           overhead: int = 256 << 20, gpus: tuple[str, ...] = (),
           segments: tuple[str, ...] | None = None) -> AgentConfig:
    return AgentConfig(name=name, segments=segments,
                       capacity=Capacity(cpus=cpus, memory=memory,
                                         reserve_cpus=reserve_cpus,
                                         reserve_memory=reserve_memory,
                                         qemu_overhead=overhead),
                       cgroup=CgroupConfig(mode=mode, root=cg_root, parent="vmagent"),
                       gpus=tuple(GPU(a) for a in gpus))
