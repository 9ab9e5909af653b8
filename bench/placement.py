"""The placement function alone (vmagent/alloc/placement.py), over a simulated fleet:
the time of one decision over 500 hosts, and the capacity a stream of 10,000 requests
leaves stranded, for best fit (what vmctl uses), first fit and random placement.

Fleet: 500 hosts of three sizes (40% 16 cores/64G, 40% 32/128G, 20% 64/256G, minus a
reserve of 1 core and 2G each), all serving dev and default. Requests: a mix of
developer VMs (dev: 0.5-2 cores, 2-8G guaranteed) and CI/service VMs (default: 1-8
cores, 4-32G), drawn with a fixed seed: the same stream for every policy.

Two runs per policy:
- ``fill``: the 10,000 requests arrive and none leaves; the fleet's guarantees come to
  more than it has, so it fills up and starts refusing. Reported: how full the fleet
  was at the first refusal, how many were refused, and at the end the share of
  allocatable capacity left free, and the share *stranded*: free on hosts that cannot
  take even the smallest request of the mix.
- ``churn``: the stream fills the fleet until its first refusal; from then on, before
  each arrival a random resident VM leaves, so the fleet stays near full with holes
  opening and closing (the life of a CI fleet). Reported: the requests refused in this
  steady state and the same shares at the end.

    python3 bench/placement.py [--hosts 500] [--requests 10000] [--seed 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vmagent.alloc import placement as pl  # noqa: E402
from vmagent.alloc.sizing import Demand  # noqa: E402

G = 1 << 30
HOST_SIZES = ((0.4, 16, 64 * G), (0.4, 32, 128 * G), (0.2, 64, 256 * G))
RESERVE = (1.0, 2 * G)
DEV = ([0.5, 1.0, 2.0], [2 * G, 4 * G, 8 * G])
DEFAULT = ([1.0, 2.0, 4.0, 8.0], [4 * G, 8 * G, 16 * G, 32 * G])
SMALLEST = Demand(0.5, 2 * G, 0)

Policy = Callable[[Demand, str, list, random.Random], "int | None"]
POLICIES: dict[str, Policy] = {
    "best_fit": lambda w, s, hosts, rng: pl.best_fit(w, s, hosts),
    "first_fit": lambda w, s, hosts, rng: pl.first_fit(w, s, hosts),
    "random": lambda w, s, hosts, rng: pl.random_fit(w, s, hosts, rng),
}


def fleet(n: int, rng: random.Random) -> list[pl.HostView]:
    hosts = []
    for i in range(n):
        r, acc = rng.random(), 0.0
        for share, cores, ram in HOST_SIZES:
            acc += share
            if r <= acc:
                break
        alloc = Demand(cores - RESERVE[0], ram - RESERVE[1], 0)
        hosts.append(pl.HostView(f"h{i:03d}", alloc, alloc, 0, ("dev", "default")))
    return hosts


def requests(n: int, rng: random.Random) -> list[tuple[str, Demand]]:
    out = []
    for _ in range(n):
        if rng.random() < 0.6:
            cpus, rams = DEV
            out.append(("dev", Demand(rng.choice(cpus), rng.choice(rams), 0)))
        else:
            cpus, rams = DEFAULT
            out.append(("default", Demand(rng.choice(cpus), rng.choice(rams), 0)))
    return out


def usage(hosts: list[pl.HostView]) -> dict:
    alloc_cpu = sum(h.allocatable.cpu for h in hosts)
    alloc_ram = sum(h.allocatable.ram for h in hosts)
    free_cpu = sum(h.free.cpu for h in hosts)
    free_ram = sum(h.free.ram for h in hosts)
    small = [h for h in hosts if pl.why_not(SMALLEST, None, h) is not None]
    return {"used_cpu": round(1 - free_cpu / alloc_cpu, 4),
            "used_ram": round(1 - free_ram / alloc_ram, 4),
            "free_cpu": round(free_cpu / alloc_cpu, 4),
            "free_ram": round(free_ram / alloc_ram, 4),
            "stranded_cpu": round(sum(h.free.cpu for h in small) / alloc_cpu, 4),
            "stranded_ram": round(sum(h.free.ram for h in small) / alloc_ram, 4)}


def simulate(policy: Policy, hosts: list[pl.HostView], stream: list[tuple[str, Demand]],
             churn: bool, seed: int) -> dict:
    rng = random.Random(seed)
    hosts = list(hosts)
    residents: list[tuple[int, Demand]] = []
    refused, first_refusal, times = 0, None, []
    for segment, want in stream:
        if churn and first_refusal is not None and residents:
            j, gone = residents.pop(rng.randrange(len(residents)))
            h = hosts[j]
            hosts[j] = pl.HostView(h.name, h.allocatable, h.free + gone, h.vms - 1,
                                   h.segments)
        t0 = time.perf_counter()
        i = policy(want, segment, hosts, rng)
        times.append(time.perf_counter() - t0)
        if i is None:
            refused += 1
            if first_refusal is None:
                first_refusal = usage(hosts)
        else:
            hosts[i] = hosts[i].take(want)
            residents.append((i, want))
    times.sort()
    return {"placed": len(stream) - refused, "refused": refused,
            "first_refusal": first_refusal, "end": usage(hosts),
            "decision_us": {"median": round(statistics.median(times) * 1e6, 1),
                            "p99": round(times[int(len(times) * 0.99)] * 1e6, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=500)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="50 hosts, 1,000 requests")
    args = ap.parse_args()
    if args.quick:
        args.hosts, args.requests = 50, 1000
    rng = random.Random(args.seed)
    hosts = fleet(args.hosts, rng)
    stream = requests(args.requests, rng)
    demand_cpu = sum(w.cpu for _, w in stream) / sum(h.allocatable.cpu for h in hosts)
    demand_ram = sum(w.ram for _, w in stream) / sum(h.allocatable.ram for h in hosts)
    out: dict = {"benchmark": "placement", "hosts": args.hosts,
                 "requests": args.requests, "seed": args.seed,
                 "demand_over_capacity": {"cpu": round(demand_cpu, 3),
                                          "ram": round(demand_ram, 3)},
                 "policies": {}}
    for name, policy in POLICIES.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        out["policies"][name] = {
            "fill": simulate(policy, hosts, stream, False, args.seed),
            "churn": simulate(policy, hosts, stream, True, args.seed)}
    # the full ranking vmctl shows (every host's score or reason), for comparison
    t0 = time.perf_counter()
    for segment, want in stream[:200]:
        pl.rank(want, segment, hosts)
    out["rank_all_hosts_us"] = round((time.perf_counter() - t0) / 200 * 1e6, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
