"""The metrics in Golovan's unistat form: a JSON list of ``[signal_name, value]`` pairs,
read from the same :mod:`.model` metrics as ``/metrics``.

A signal's name ends with the suffix that tells Golovan how to aggregate it (over the
instances of a host group, then over time):

* ``_ammv``: a gauge, summed over instances (``link_alive``: how many VMs answer;
  memory; VMs by state);
* ``_axxx``: a gauge of which the maximum is what matters (uptime, seconds since the
  last state change, the monitor's round time);
* ``_dmmm``: a counter: the cumulative value since the agent (or qemu) started; Golovan
  takes the differences between reads and sums them (CPU seconds, restarts,
  operations);
* ``_dhhh``: a histogram of cumulative weights, ``[[left bound, weight], ...]``
  (operation latencies); Golovan takes the differences like a counter's (``_ahhh`` would
  be a histogram of this read's weights only).

Labels become Golovan tags before the name: ``vm=web1;owner=alice;segment=dev;``, then
the metric's name and suffix. Characters a tag value may not hold become ``_``.
"""

from __future__ import annotations

import re
from typing import Any

from vmagent.monitor.model import Histogram, Metric

GAUGE_SUM = "_ammv"
GAUGE_MAX = "_axxx"
COUNTER = "_dmmm"
HISTOGRAM = "_dhhh"

# gauges whose maximum over instances is what a dashboard shows
MAX_GAUGES = frozenset({"vmagent_vm_uptime_seconds", "vmagent_vm_state_age_seconds",
                        "vmagent_monitor_tick_seconds"})
_TAG_RE = re.compile(r"[^A-Za-z0-9_.:/@+-]")


def suffix(m: Metric) -> str:
    if m.kind == "counter":
        return COUNTER
    if m.kind == "histogram":
        return HISTOGRAM
    return GAUGE_MAX if m.name in MAX_GAUGES else GAUGE_SUM


def _tags(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return "".join(f"{n}={_TAG_RE.sub('_', v) or '_'};" for n, v in zip(names, values))


def signals(metrics: list[Metric]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for m in metrics:
        sfx = suffix(m)
        base = m.name.removeprefix("vmagent_")
        if m.kind == "counter":
            base = base.removesuffix("_total") + "_total"
        for lv, value in m.samples:
            name = f"{_tags(m.labels, lv)}{base}{sfx}"
            if isinstance(value, Histogram):
                out.append([name, value.weights()])
            else:
                out.append([name, value])
    return out
