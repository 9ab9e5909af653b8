"""The signals as data, before any format: a metric has a name, a kind (gauge, counter,
histogram), help text and samples (labels -> value). :mod:`.metrics` turns them into
Prometheus' exposition (through prometheus-client), :mod:`.unistat` into Golovan's
unistat JSON; both read the same list, so the two never disagree."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

KINDS = ("gauge", "counter", "histogram")

# seconds: from a status read (milliseconds) to a template build (minutes)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0, 900.0)


@dataclass
class Histogram:
    """Counts of observations per bucket (upper bounds ``bounds``, then +Inf), their
    sum and count."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus' buckets: (le, observations <= le), +Inf last."""
        out, total = [], 0
        for bound, n in zip([*map(_le, self.bounds), "+Inf"], self.counts):
            total += n
            out.append((bound, total))
        return out

    def weights(self) -> list[list[float]]:
        """unistat's buckets: [left bound, observations in the bucket]."""
        lefts = (0.0, *self.bounds)
        return [[lefts[i], n] for i, n in enumerate(self.counts)]


def _le(bound: float) -> str:
    return repr(float(bound))


Labels = dict[str, str]


@dataclass
class Metric:
    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    samples: list[tuple[tuple[str, ...], float | Histogram]] = field(default_factory=list)

    def add(self, value: float | Histogram, *label_values: str) -> None:
        if len(label_values) != len(self.labels):
            raise ValueError(f"{self.name}: labels {self.labels}, got {label_values}")
        self.samples.append((tuple(str(v) for v in label_values), value))
