"""Each VM's qemu in a cgroup of its own: cgroup v2 (``cpu.weight``, ``cpu.max``,
``memory.min``, ``memory.max``) or v1 (``cpu.shares``, ``cpu.cfs_quota_us``,
``memory.soft_limit_in_bytes``, ``memory.limit_in_bytes``), behind one interface.

qemu starts inside its cgroup: the launcher runs it through :meth:`Cgroups.wrap`, a
``/bin/sh`` that writes its own pid into the cgroup's ``cgroup.procs`` files and then
execs qemu, so qemu's first instruction, the threads it makes, the process
``-daemonize`` forks and every page of guest RAM are in the cgroup (and charged to it)
from the start; nothing has to be moved, and nothing runs outside it while a mover
catches up with new threads. A qemu found running after an agent restart is checked
and, if it is not in its cgroup (an agent from before cgroups), moved in whole with
:meth:`Cgroups.attach` (``cgroup.procs`` moves every thread of the process; on v1 its
memory charges move with it where the kernel still can).

The v1 and v2 file trees and the choice between them: :mod:`vmagent.alloc.cgroupfs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmagent.spec import VMSpec

CFS_PERIOD_US = 100_000
V1_SHARES_PER_CORE = 1024
V2_WEIGHT_PER_CORE = 100
ENTER_SCRIPT = ('while [ "$1" != -- ]; do echo $$ > "$1" || '
                '{ echo "vmagent: cannot put qemu into its cgroup ($1)" >&2; exit 125; }; '
                'shift; done; shift; exec "$@"')


@dataclass(frozen=True)
class Limits:
    """What a VM's cgroup says, from its (sized) spec."""

    cpu_guarantee: float | None     # cores: the weight
    cpu_limit: float | None         # cores: the quota (None: no ceiling)
    ram_guarantee: int              # bytes: protection
    ram_limit: int                  # bytes: the ceiling

    @classmethod
    def of(cls, spec: VMSpec) -> "Limits":
        return cls(spec.cpu_guarantee, spec.cpu_limit, spec.ram_guarantee or 0,
                   spec.ram_limit or 0)

    def v1(self) -> dict[str, dict[str, str]]:
        shares = max(2, round((self.cpu_guarantee or 0) * V1_SHARES_PER_CORE))
        quota = -1 if self.cpu_limit is None else max(1000, round(self.cpu_limit *
                                                                  CFS_PERIOD_US))
        return {"cpu": {"cpu.shares": str(shares), "cpu.cfs_period_us": str(CFS_PERIOD_US),
                        "cpu.cfs_quota_us": str(quota)},
                "memory": {"memory.soft_limit_in_bytes": str(self.ram_guarantee),
                           "memory.limit_in_bytes": str(self.ram_limit)}}

    def v2(self) -> dict[str, str]:
        weight = min(10000, max(1, round((self.cpu_guarantee or 0) * V2_WEIGHT_PER_CORE)))
        quota = "max" if self.cpu_limit is None else str(max(1000, round(
            self.cpu_limit * CFS_PERIOD_US)))
        return {"cpu.weight": str(weight), "cpu.max": f"{quota} {CFS_PERIOD_US}",
                "memory.min": str(self.ram_guarantee), "memory.max": str(self.ram_limit)}


class Cgroups(Protocol):
    kind: str           # "v1" | "v2" | "none"
    parent: str
    parent_cores: float | None   # the CPU weight of the parent, in cores

    def describe(self) -> dict[str, Any]: ...

    def path(self, name: str) -> str | None: ...

    def dirs(self, name: str) -> list[Path]: ...

    def exists(self, name: str) -> bool: ...

    def create(self, name: str, limits: Limits) -> None: ...

    def apply(self, name: str, limits: Limits) -> None: ...

    def wrap(self, name: str) -> list[str]: ...

    def attach(self, name: str, pid: int) -> None: ...

    def contains(self, name: str, pid: int) -> bool: ...

    def remove(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...

    def values(self, name: str) -> dict[str, str]: ...

    def usage(self, name: str) -> dict[str, Any]: ...


class NoCgroups:
    """No enforcement (``mode = "none"``, or no usable hierarchy): admission still
    counts the guarantees."""

    kind = "none"

    def __init__(self, reason: str, parent: str = "") -> None:
        self.reason = reason
        self.parent = parent
        self.parent_cores: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"version": "none", "reason": self.reason}

    def path(self, name: str) -> str | None:
        return None

    def dirs(self, name: str) -> list[Path]:
        return []

    def exists(self, name: str) -> bool:
        return True

    def create(self, name: str, limits: Limits) -> None:
        pass

    apply = create

    def wrap(self, name: str) -> list[str]:
        return []

    def attach(self, name: str, pid: int) -> None:
        pass

    def contains(self, name: str, pid: int) -> bool:
        return True

    def remove(self, name: str) -> bool:
        return True

    def names(self) -> list[str]:
        return []

    def values(self, name: str) -> dict[str, str]:
        return {}

    def usage(self, name: str) -> dict[str, Any]:
        return {}
