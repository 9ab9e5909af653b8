"""The ``host`` operation: what this agent is and what its host holds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vmagent import __version__
from vmagent.context import RequestContext
from vmagent.qemu.host import QemuHost
from vmagent.vms.registry import VMRegistry
from vmagent.vms.state import State
from vmagent.vms.status import host_capacity

if TYPE_CHECKING:                     # pragma: no cover
    from vmagent.alloc.service import Allocator


class HostService:
    def __init__(self, registry: VMRegistry, host: QemuHost, state_dir: Path,
                 alloc: Allocator | None = None) -> None:
        self.registry = registry
        self.host = host
        self.state_dir = state_dir
        self.alloc = alloc

    async def show(self, ctx: RequestContext) -> dict:
        return self.report()

    def report(self) -> dict:
        running = [v for v in self.registry if v.rec.rt.state == State.RUNNING]
        # name, segments, resources (total, allocatable, guaranteed, free), allocation
        alloc = self.alloc.report() if self.alloc is not None else {}
        return {**alloc, "version": __version__,
                "accel": self.host.accel.to_json() if self.host.accel else None,
                "qemu_version": self.host.version,
                "capacity": host_capacity(self.state_dir),
                "allocated": {"cpus": sum(v.rec.spec.cpus or 0 for v in running),
                              "memory": sum(v.rec.spec.memory or 0 for v in running)},
                "vms": {"total": len(self.registry), "running": len(running)},
                "state_dir": str(self.state_dir)}
