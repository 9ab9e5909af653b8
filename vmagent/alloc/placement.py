"""Where a VM goes in the fleet (pure; part of the contract: vmctl places with it, the
agents refuse with its messages, ``bench/placement.py`` measures it).

A host can take a request when it serves the request's segment and its free capacity
(allocatable minus the guarantees it holds, creates in flight included) covers the
request's guarantees: ``cpu_guarantee`` cores, ``ram_guarantee`` bytes and ``gpus``.
Among those, the **best fit** wins: the score is the share of the host's allocatable
CPU and RAM that would be taken after placing the request, averaged over the two,

    score = 1 - ((free_cpu - cpu) / alloc_cpu + (free_ram - ram) / alloc_ram) / 2

so the host left with the least room scores highest (1.0: exactly full). Ties (equal to
six decimals) go to the host with fewer VMs, then to the host name. Best fit keeps the
large holes open for large requests, where spreading (worst fit) or first fit cut them
up; docs/performance.md has the measured stranding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from vmagent.alloc.sizing import Demand, Rules, show_size

EPSILON = 1e-9


@dataclass(frozen=True)
class Shortfall:
    field: str          # the request's field: cpu_guarantee, ram_guarantee, gpus
    requested: float
    free: float

    def text(self, host: str) -> str:
        if self.field == "ram_guarantee":
            return (f"ram_guarantee {show_size(int(self.requested))} > "
                    f"{show_size(max(0, int(self.free)))} free on {host}")
        if self.field == "gpus":
            return f"gpus {int(self.requested)} > {max(0, int(self.free))} free on {host}"
        cores = cores_text(self.free)
        return (f"cpu_guarantee {self.requested:g} > {cores} "
                f"{'core' if cores == '1' else 'cores'} free on {host}")

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "requested": self.requested,
                "free": round(max(self.free, 0), 4)}


def cores_text(n: float) -> str:
    return f"{max(n, 0.0):.2f}".rstrip("0").rstrip(".") or "0"


def shortfalls(want: Demand, free: Demand) -> list[Shortfall]:
    """What of ``want`` does not fit in ``free``."""
    out = []
    if want.cpu > free.cpu + EPSILON:
        out.append(Shortfall("cpu_guarantee", want.cpu, free.cpu))
    if want.ram > free.ram:
        out.append(Shortfall("ram_guarantee", want.ram, free.ram))
    if want.gpus > free.gpus:
        out.append(Shortfall("gpus", want.gpus, free.gpus))
    return out


@dataclass(frozen=True)
class HostView:
    """What placement knows of a host (from its ``host`` report)."""

    name: str
    allocatable: Demand
    free: Demand
    vms: int = 0
    segments: tuple[str, ...] = ("dev", "default")
    rules: Rules = field(default_factory=Rules)

    @classmethod
    def from_report(cls, name: str, doc: dict[str, Any]) -> "HostView":
        res = doc.get("resources") or {}

        def pair(key: str, cast: type) -> tuple[Any, Any]:
            r = res.get(key) or {}
            return cast(r.get("allocatable") or 0), cast(r.get("free") or 0)
        (ac, fc), (ar, fr), (ag, fg) = pair("cpu", float), pair("memory", int), \
            pair("gpu", int)
        return cls(name, Demand(ac, ar, ag), Demand(fc, fr, fg),
                   int((doc.get("vms") or {}).get("total") or 0),
                   tuple(doc.get("segments") or ()),
                   Rules.from_json((doc.get("allocation") or {}).get("rules")))

    def take(self, want: Demand) -> "HostView":
        """The host after placing ``want`` (for simulations)."""
        return HostView(self.name, self.allocatable, self.free - want, self.vms + 1,
                        self.segments, self.rules)


@dataclass(frozen=True)
class Option:
    """One host's answer to one request: its score, or why it cannot take it."""

    host: str
    score: float | None
    vms: int
    reason: str | None = None

    @property
    def fits(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"host": self.host, "vms": self.vms, "fits": self.fits}
        if self.fits:
            out["score"] = round(self.score or 0.0, 4)
        else:
            out["reason"] = self.reason
        return out


def score(want: Demand, host: HostView) -> float:
    """Higher is a tighter fit (see the module's docstring)."""
    terms = []
    for free, need, alloc in ((host.free.cpu, want.cpu, host.allocatable.cpu),
                              (host.free.ram, want.ram, host.allocatable.ram)):
        terms.append((free - need) / alloc if alloc > 0 else 0.0)
    return 1.0 - sum(terms) / len(terms)


def why_not(want: Demand, segment: str | None, host: HostView) -> str | None:
    """None if ``host`` can take the request, else the reason (as the agent says it)."""
    if segment is not None and segment not in host.segments:
        return (f"segment {segment} is not served by {host.name} (it serves "
                f"{', '.join(host.segments) or 'nothing'})")
    short = shortfalls(want, host.free)
    if short:
        return "; ".join(s.text(host.name) for s in short)
    return None


def rank(want: Demand | Sequence[Demand], segment: str | None | Sequence[str | None],
         hosts: Iterable[HostView]) -> list[Option]:
    """Every host's option, best first: those that fit by score (ties: fewer VMs, then
    the name), then those that do not, by name. ``want`` and ``segment`` may be one per
    host (each host sizes a request with its own rules), in the order of ``hosts``."""
    hosts = list(hosts)
    wants = list(want) if isinstance(want, (list, tuple)) else [want] * len(hosts)
    segs = list(segment) if isinstance(segment, (list, tuple)) else [segment] * len(hosts)
    options = []
    for w, s, h in zip(wants, segs, hosts):
        reason = why_not(w, s, h)
        options.append(Option(h.name, None if reason else score(w, h), h.vms, reason))
    fitting = sorted((o for o in options if o.fits),
                     key=lambda o: (-round(o.score or 0.0, 6), o.vms, o.host))
    return fitting + sorted((o for o in options if not o.fits), key=lambda o: o.host)


def fits(want: Demand, segment: str | None, host: HostView) -> bool:
    """:func:`why_not` is None, without the words (for many hosts)."""
    f = host.free
    return not (want.cpu > f.cpu + EPSILON or want.ram > f.ram or want.gpus > f.gpus or (
        segment is not None and segment not in host.segments))


def best_fit(want: Demand, segment: str | None, hosts: Sequence[HostView]) -> int | None:
    """The index of the chosen host (the fast path of :func:`rank`, for many hosts)."""
    best, best_key = None, None
    for i, h in enumerate(hosts):
        if not fits(want, segment, h):
            continue
        key = (-round(score(want, h), 6), h.vms, h.name)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def first_fit(want: Demand, segment: str | None, hosts: Sequence[HostView]) -> int | None:
    """The first host in order that fits (a baseline)."""
    for i, h in enumerate(hosts):
        if fits(want, segment, h):
            return i
    return None


def random_fit(want: Demand, segment: str | None, hosts: Sequence[HostView],
               rng: random.Random) -> int | None:
    """A random host among those that fit (a baseline)."""
    fitting = [i for i, h in enumerate(hosts) if fits(want, segment, h)]
    return rng.choice(fitting) if fitting else None
