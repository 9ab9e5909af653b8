"""A VM's allocation completed and checked (pure; part of the contract: vmctl estimates
a request's demand on each host with it, from the rules that host reports).

The rules (docs/allocation.md):

- guest RAM (``memory``): given, else ``ram_limit`` minus qemu's overhead, else
  ``ram_guarantee``, else the host's default;
- ``ram_limit``: given, else guest RAM plus qemu's overhead; a given ``memory`` that
  does not fit under a given ``ram_limit`` with the overhead is refused;
- ``ram_guarantee``: given, else ``ram_limit`` (the whole VM is promised: a guest's RAM
  cannot be taken back from it without harm); above ``ram_limit`` is refused;
- ``cpu_limit``: segments ``dev`` and ``gpu-dev`` have none (the host's cores; a given
  one is refused); ``default``: given, else the vCPU count (or the guarantee, if that
  is more);
- ``cpu_guarantee``: given, else the host's default (none by default: nothing is
  promised and the VM has the smallest CPU weight); at most 2 in ``dev``/``gpu-dev``
  (:meth:`VMSpec.check_allocation`);
- ``gpus``: segment ``gpu-dev`` only, at least 1 (default 1).

:func:`resize` is the same for ``push_config``: a field that had its derived value
follows the field it derives from (a new ``memory`` moves a ``ram_limit`` that was
``memory`` + overhead), one that was set stays.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vmagent.errors import BadRequest
from vmagent.spec import MAX_MEMORY, MIN_MEMORY, SEGMENTS, VMSpec, format_size

MiB = 1 << 20
# what qemu itself uses beyond the guest's RAM (measured: docs/allocation.md): its
# heap, thread stacks, device state and VGA RAM; under TCG also its buffer of
# translated code (vmagent/qemu/argv.py: TCG_TB_MIB)
QEMU_BASE_OVERHEAD = 256 * MiB
TCG_CODE_BUFFER = 256 * MiB
QEMU_OVERHEAD = QEMU_BASE_OVERHEAD + TCG_CODE_BUFFER     # the larger of the two


def overhead_for(accel: str) -> int:
    """qemu's overhead with this accelerator (kvm or tcg)."""
    return QEMU_BASE_OVERHEAD + (TCG_CODE_BUFFER if accel != "kvm" else 0)
DEV_SEGMENTS = ("dev", "gpu-dev")
GPU_SEGMENT = "gpu-dev"


@dataclass(frozen=True)
class Rules:
    """What a host fills in for what a request leaves out (reported by ``host``)."""

    overhead: int = QEMU_OVERHEAD       # bytes
    cpu_guarantee: float = 0.0          # cores
    cpus: int = 2
    memory: int = 2 << 30               # bytes
    segment: str = "dev"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> "Rules":
        if not isinstance(doc, dict):
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known and v is not None})


@dataclass(frozen=True)
class Demand:
    """What a VM holds on its host from its creation to its deletion."""

    cpu: float = 0.0     # cores guaranteed
    ram: int = 0         # bytes guaranteed
    gpus: int = 0

    def __add__(self, other: "Demand") -> "Demand":
        return Demand(self.cpu + other.cpu, self.ram + other.ram, self.gpus + other.gpus)

    def __sub__(self, other: "Demand") -> "Demand":
        return Demand(self.cpu - other.cpu, self.ram - other.ram, self.gpus - other.gpus)

    def to_json(self) -> dict[str, Any]:
        return {"cpu": round(self.cpu, 4), "ram": self.ram, "gpus": self.gpus}


def demand(spec: VMSpec) -> Demand:
    """The reservation of a sized spec."""
    return Demand(spec.cpu_guarantee or 0.0, spec.ram_guarantee or 0, spec.gpus or 0)


def derived_memory(ram_limit: int, overhead: int) -> int:
    """The guest RAM that fits under ``ram_limit`` with qemu's overhead (whole MiB)."""
    return (ram_limit - overhead) // MiB * MiB


def size(spec: VMSpec, rules: Rules = Rules()) -> VMSpec:
    """A new spec with every allocation field, cpus, memory and segment filled in;
    BadRequest when they contradict each other."""
    out = dataclasses.replace(spec, ssh_keys=list(spec.ssh_keys), admins=list(spec.admins))
    out.segment = segment = out.segment or rules.segment
    if segment not in SEGMENTS:
        raise BadRequest(f"segment: {segment!r} is not one of {', '.join(SEGMENTS)}")
    out.cpus = out.cpus or rules.cpus
    _gpus(out)
    _cpu(out, rules)
    _ram(out, rules)
    out.check_allocation()
    return out


def _gpus(out: VMSpec) -> None:
    if out.segment == GPU_SEGMENT:
        out.gpus = 1 if out.gpus is None else out.gpus
        if out.gpus < 1:
            raise BadRequest("gpus: segment gpu-dev is for VMs with a GPU: ask for at "
                             "least 1 (or use segment dev)")
    elif out.gpus:
        raise BadRequest(f"gpus: only segment gpu-dev has GPUs; this VM is in segment "
                         f"{out.segment!r}")
    else:
        out.gpus = 0


def _cpu(out: VMSpec, rules: Rules) -> None:
    if out.segment in DEV_SEGMENTS:
        if out.cpu_limit is not None:
            raise BadRequest(f"cpu_limit: segment {out.segment!r} has no CPU limit (a "
                             "developer VM may use all of the host's cores); use segment "
                             "'default' for a VM with a CPU limit")
    elif out.cpu_limit is None:
        out.cpu_limit = float(max(out.cpus, out.cpu_guarantee or 0))
    if out.cpu_guarantee is None and rules.cpu_guarantee > 0:   # None: nothing promised
        default = rules.cpu_guarantee
        out.cpu_guarantee = min(default, out.cpu_limit) if out.cpu_limit else default


def _ram(out: VMSpec, rules: Rules) -> None:
    over = rules.overhead
    if out.memory is None:
        if out.ram_limit is not None:
            out.memory = derived_memory(out.ram_limit, over)
            if out.memory < MIN_MEMORY:
                raise BadRequest(
                    f"ram_limit {format_size(out.ram_limit)} leaves "
                    f"{_size(max(out.memory, 0))} for the guest after qemu's overhead of "
                    f"{_size(over)}: the guest needs at least {format_size(MIN_MEMORY)}, "
                    f"so ram_limit must be at least {_size(MIN_MEMORY + over)}")
        elif out.ram_guarantee is not None:
            out.memory = max(out.ram_guarantee // MiB * MiB, MIN_MEMORY)
        else:
            out.memory = rules.memory
        out.memory = min(out.memory, MAX_MEMORY)
    if out.ram_limit is None:
        out.ram_limit = out.memory + over
    elif out.memory + over > out.ram_limit:
        raise BadRequest(
            f"memory {_size(out.memory)} does not fit under ram_limit "
            f"{_size(out.ram_limit)}: qemu needs {_size(over)} beyond the guest's RAM, so "
            f"give ram_limit at least {_size(out.memory + over)}, or leave out memory (it "
            f"then defaults to ram_limit - {_size(over)})")
    if out.ram_guarantee is None:
        out.ram_guarantee = out.ram_limit


def resize(old: VMSpec, fields: dict[str, Any], rules: Rules = Rules()) -> VMSpec:
    """``push_config``: the old (sized) spec with ``fields`` given anew, sized again.
    A field that had the value derived from another follows it when only that other
    one is given; a field given stays as given."""
    if fields.get("segment") not in (None, old.segment) and old.segment is not None:
        raise BadRequest(f"segment: the segment of a VM cannot change ({old.segment} -> "
                         f"{fields['segment']}); create a new VM in segment "
                         f"{fields['segment']!r}")
    data = {**old.to_dict(), **fields}
    given = {k for k, v in fields.items() if v is not None}
    over = rules.overhead
    links = (   # (derived field, the field it derives from, the old value was derived)
        ("ram_limit", "memory", old.ram_limit is not None and old.memory is not None
         and old.ram_limit == old.memory + over),
        ("memory", "ram_limit", old.ram_limit is not None and old.memory is not None
         and old.memory == derived_memory(old.ram_limit, over)),
        ("cpu_limit", "cpus", old.cpu_limit is not None and old.cpus is not None
         and math.isclose(old.cpu_limit, old.cpus)),
    )
    for derived, source, was_derived in links:
        if source in given and derived not in given and was_derived:
            data[derived] = None
    if "ram_guarantee" not in given and old.ram_guarantee == old.ram_limit:
        data["ram_guarantee"] = None         # it follows ram_limit, changed or not
    if (data.get("segment") or rules.segment) in DEV_SEGMENTS and "cpu_limit" not in given:
        data["cpu_limit"] = None             # (a record from before segments had rules)
    return size(VMSpec.from_dict(data), rules)


def _size(n: int) -> str:
    """An exact size when it is one (2G, 320M), else one decimal (2.3G)."""
    exact = format_size(n)
    if exact[-1:].isalpha() and len(exact) <= 6:
        return exact
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"


def show_size(n: int) -> str:
    return _size(n)
