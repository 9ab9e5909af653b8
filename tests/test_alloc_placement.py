"""The ledger and its admission (numbers in refusals), and the placement function: the
score, its ties, the reasons of hosts that cannot take a request, the baselines."""

from __future__ import annotations

import random

import pytest

from alloc_helpers import config
from vmagent.alloc import placement as pl
from vmagent.alloc.capacity import Ledger, Offer
from vmagent.alloc.sizing import Demand
from vmagent.errors import Conflict

G = 1 << 30


def ledger(held=(), **kw) -> Ledger:
    cfg = config(None, **kw)
    return Ledger(cfg.name, Offer.of(cfg), cfg.served, lambda: list(held))


# --- the ledger -------------------------------------------------------------------------

def test_allocatable_is_the_offer_minus_the_reserve():
    lg = ledger(cpus=4, memory=8 * G, reserve_cpus=0.5, reserve_memory=G)
    assert lg.offer.allocatable == Demand(3.5, 7 * G, 0)
    rep = lg.report()
    assert rep["cpu"] == {"unit": "cores", "total": 4, "reserved": 0.5, "allocatable": 3.5,
                          "guaranteed": 0, "free": 3.5, "in_flight": 0}
    assert rep["memory"]["allocatable"] == 7 * G and rep["gpu"]["total"] == 0


def test_a_refusal_says_what_does_not_fit_with_the_numbers():
    lg = ledger(held=[("a", Demand(0.5, 2 * G, 0))], cpus=2, memory=4 * G)
    with pytest.raises(Conflict) as exc:
        lg.hold("b", Demand(4, G, 0), "dev")
    assert exc.value.message == "cpu_guarantee 4 > 1 core free on host-a"
    assert exc.value.details["refused"] == "capacity"
    assert exc.value.details["shortfalls"] == [
        {"field": "cpu_guarantee", "requested": 4, "free": 1.0}]
    with pytest.raises(Conflict) as exc:
        lg.hold("b", Demand(1.5, 2 * G, 1), "dev")
    assert exc.value.message == ("cpu_guarantee 1.5 > 1 core free on host-a; "
                                 "ram_guarantee 2G > 1G free on host-a; gpus 1 > 0 free "
                                 "on host-a (it has no GPUs in its config)")
    assert lg.in_flight == {}


def test_fractional_free_cores_read_like_the_issue():
    lg = ledger(held=[("a", Demand(0.5, 0, 0))], cpus=2.5, reserve_cpus=0.5)
    with pytest.raises(Conflict, match=r"^cpu_guarantee 4 > 1.5 cores free on host-a$"):
        lg.check("b", Demand(4, 0, 0), None)


def test_creates_in_flight_count_from_acceptance():
    lg = ledger(cpus=2, memory=4 * G)                   # 1.5 cores, 3G allocatable
    lg.hold("a", Demand(1, G, 0), "dev")
    with pytest.raises(Conflict, match="cpu_guarantee 1 > 0.5 cores free"):
        lg.hold("b", Demand(1, G, 0), "dev")
    assert lg.report()["cpu"]["in_flight"] == 1
    lg.release("a")
    lg.hold("b", Demand(1, G, 0), "dev")


def test_a_vm_in_flight_and_registered_is_counted_once():
    held = [("a", Demand(1, G, 0))]
    lg = ledger(held=held, cpus=2, memory=4 * G)
    lg.in_flight["a"] = Demand(1, G, 0)
    assert lg.used() == Demand(1, G, 0)


def test_push_config_replaces_the_vms_own_reservation():
    lg = ledger(held=[("a", Demand(1, G, 0))], cpus=2, memory=4 * G)
    lg.check("a", Demand(1.5, 3 * G, 0), None, exclude="a")
    with pytest.raises(Conflict):
        lg.check("a", Demand(1.6, 0, 0), None, exclude="a")


def test_a_segment_the_host_does_not_serve_is_refused():
    lg = ledger(segments=("dev",))
    with pytest.raises(Conflict) as exc:
        lg.check("a", Demand(), "default")
    assert exc.value.message == "segment default is not served by host-a (it serves dev)"
    assert exc.value.details["refused"] == "segment"


# --- the placement function -------------------------------------------------------------

def host(name, free_cpu, free_ram, alloc_cpu=8.0, alloc_ram=32 * G, vms=0,
         segments=("dev", "default"), gpus=0) -> pl.HostView:
    return pl.HostView(name, Demand(alloc_cpu, alloc_ram, gpus),
                       Demand(free_cpu, free_ram, gpus), vms, segments)


def test_best_fit_on_guarantees():
    want = Demand(2, 4 * G, 0)
    hosts = [host("roomy", 8, 32 * G), host("tight", 2, 6 * G), host("mid", 4, 16 * G)]
    ranked = pl.rank(want, "dev", hosts)
    assert [o.host for o in ranked] == ["tight", "mid", "roomy"]
    assert ranked[0].score == pytest.approx(1 - (0 / 8 + 2 / 32) / 2)
    assert pl.best_fit(want, "dev", hosts) == 1


def test_ties_go_to_fewer_vms_then_the_name():
    want = Demand(1, G, 0)
    hosts = [host("b", 4, 8 * G, vms=3), host("c", 4, 8 * G, vms=1),
             host("a", 4, 8 * G, vms=1)]
    assert [o.host for o in pl.rank(want, None, hosts)] == ["a", "c", "b"]
    assert hosts[pl.best_fit(want, None, hosts)].name == "a"


def test_hosts_that_cannot_take_it_say_why():
    want = Demand(3, 8 * G, 0)
    hosts = [host("small", 1.5, 4 * G), host("devonly", 8, 32 * G, segments=("dev",)),
             host("ok", 4, 16 * G)]
    ranked = pl.rank(want, "default", hosts)
    assert [(o.host, o.fits) for o in ranked] == [("ok", True), ("devonly", False),
                                                  ("small", False)]
    assert ranked[1].reason == "segment default is not served by devonly (it serves dev)"
    assert ranked[2].reason == ("cpu_guarantee 3 > 1.5 cores free on small; "
                                "ram_guarantee 8G > 4G free on small")
    assert ranked[2].to_json() == {"host": "small", "vms": 0, "fits": False,
                                   "reason": ranked[2].reason}


def test_one_demand_per_host():
    hosts = [host("a", 4, 8 * G), host("b", 4, 8 * G)]
    ranked = pl.rank([Demand(1, 9 * G, 0), Demand(1, G, 0)], None, hosts)
    assert [(o.host, o.fits) for o in ranked] == [("b", True), ("a", False)]


def test_the_host_view_reads_a_host_report():
    doc = {"segments": ["dev"], "vms": {"total": 3},
           "resources": {"cpu": {"allocatable": 1.5, "free": 0.5},
                         "memory": {"allocatable": 3 * G, "free": G},
                         "gpu": {"allocatable": 0, "free": 0}},
           "allocation": {"rules": {"overhead": 123, "cpu_guarantee": 0.25}}}
    v = pl.HostView.from_report("h", doc)
    assert v.allocatable == Demand(1.5, 3 * G, 0) and v.free == Demand(0.5, G, 0)
    assert v.vms == 3 and v.segments == ("dev",) and v.rules.overhead == 123
    assert v.take(Demand(0.5, G, 0)).free == Demand(0, 0, 0)
    assert pl.HostView.from_report("old", {}).segments == ()


def test_baselines():
    want = Demand(1, G, 0)
    hosts = [host("full", 0, 0), host("a", 8, 32 * G), host("b", 1, G)]
    assert pl.first_fit(want, None, hosts) == 1
    picks = {pl.random_fit(want, None, hosts, random.Random(s)) for s in range(20)}
    assert picks == {1, 2}
    assert pl.first_fit(Demand(9, 0, 0), None, hosts) is None
    assert pl.best_fit(Demand(9, 0, 0), None, hosts) is None


def test_the_placement_benchmark_runs_and_reports_every_policy():
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "bench" / "placement.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc["policies"]) == {"best_fit", "first_fit", "random"}
    for runs in doc["policies"].values():
        fill = runs["fill"]
        assert fill["placed"] + fill["refused"] == 1000 and fill["refused"] > 0
        assert fill["first_refusal"]["used_ram"] > 0.5
        assert fill["decision_us"]["median"] > 0
        end = fill["end"]
        assert 0 <= end["stranded_ram"] <= end["free_ram"] <= 1
        assert runs["churn"]["placed"] > fill["placed"]     # departures made room
