"""The host's capacity and its ledger of reservations: what it offers (its cores and
RAM, or what its config says, minus a reserve for the host itself), what its VMs hold
(their guarantees, from creation to deletion, running or stopped) and what creates in
flight hold (from the moment the agent accepts them), and the admission of a new
demand against them: a refusal says what does not fit, with the numbers.

The agent is the authority for its own capacity: the ledger counts reservations, never
what the host's free memory says at the moment, so concurrent requests (from any number
of clients) cannot overcommit it. The check and the hold happen in one step of the
event loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from vmagent.alloc.config import AgentConfig
from vmagent.alloc.placement import HostView, shortfalls, why_not
from vmagent.alloc.sizing import Demand
from vmagent.errors import Conflict

log = logging.getLogger(__name__)


def mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Offer:
    """What the host offers VMs: totals, and what is allocatable after the reserve."""

    cpus: float
    memory: int
    gpus: tuple[str, ...]
    reserve_cpus: float
    reserve_memory: int

    @classmethod
    def of(cls, cfg: AgentConfig) -> "Offer":
        cap = cfg.capacity
        cpus = cap.cpus if cap.cpus is not None else float(os.cpu_count() or 1)
        memory = cap.memory if cap.memory is not None else mem_total()
        return cls(cpus, memory, tuple(g.address for g in cfg.gpus), cap.reserve_cpus,
                   cap.reserve_memory)

    @property
    def allocatable(self) -> Demand:
        return Demand(max(0.0, self.cpus - self.reserve_cpus),
                      max(0, self.memory - self.reserve_memory), len(self.gpus))


# the reservations of the VMs that exist: (name, demand)
Held = Callable[[], Iterable[tuple[str, Demand]]]


class Ledger:
    def __init__(self, name: str, offer: Offer, segments: tuple[str, ...],
                 held: Held) -> None:
        self.name = name
        self.offer = offer
        self.segments = segments
        self.held = held
        self.in_flight: dict[str, Demand] = {}

    def used(self, exclude: str | None = None) -> Demand:
        total = Demand()
        for name, d in self.held():
            if name != exclude and name not in self.in_flight:
                total = total + d
        for name, d in self.in_flight.items():
            if name != exclude:
                total = total + d
        return total

    def free(self, exclude: str | None = None) -> Demand:
        return self.offer.allocatable - self.used(exclude)

    def check(self, name: str, want: Demand, segment: str | None,
              exclude: str | None = None) -> None:
        """Conflict (409) with the numbers when ``want`` does not fit (``exclude``: a
        VM whose own reservation is replaced, for push_config)."""
        if segment is not None and segment not in self.segments:
            view = HostView(self.name, self.offer.allocatable, Demand(), 0, self.segments)
            raise Conflict(str(why_not(want, segment, view)), refused="segment",
                           host=self.name, segment=segment, served=list(self.segments))
        short = shortfalls(want, self.free(exclude))
        if not short:
            return
        why = "; ".join(s.text(self.name) for s in short)
        if any(s.field == "gpus" for s in short) and not self.offer.gpus:
            why += " (it has no GPUs in its config)"
        raise Conflict(why, refused="capacity", host=self.name, vm=name,
                       shortfalls=[s.to_json() for s in short])

    def hold(self, name: str, want: Demand, segment: str | None) -> None:
        """Check and, if it fits, reserve ``want`` for the create of ``name`` (one step:
        no other request runs in between)."""
        self.check(name, want, segment)
        self.in_flight[name] = want

    def release(self, name: str) -> None:
        self.in_flight.pop(name, None)

    def report(self) -> dict[str, Any]:
        """Per resource: total, reserved for the host, allocatable, guaranteed, free."""
        alloc = self.offer.allocatable
        used = self.used()
        flight = Demand()
        for d in self.in_flight.values():
            flight = flight + d

        def row(total: float, reserve: float, allocatable: float, guaranteed: float,
                in_flight: float, unit: str, rounding: Callable[[float], Any]) -> dict:
            return {"unit": unit, "total": rounding(total), "reserved": rounding(reserve),
                    "allocatable": rounding(allocatable), "guaranteed": rounding(guaranteed),
                    "free": rounding(allocatable - guaranteed),
                    "in_flight": rounding(in_flight)}
        cpu = row(self.offer.cpus, self.offer.reserve_cpus, alloc.cpu, used.cpu,
                  flight.cpu, "cores", lambda v: round(v, 4))
        mem = row(self.offer.memory, self.offer.reserve_memory, alloc.ram, used.ram,
                  flight.ram, "bytes", int)
        gpu = row(len(self.offer.gpus), 0, alloc.gpus, used.gpus, flight.gpus, "devices",
                  int)
        return {"cpu": cpu, "memory": mem, "gpu": gpu}
