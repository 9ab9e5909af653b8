"""Parallel creates: 3 VMs created at once through the agent versus one alone, each until
an SSH login works; and the same with bare qemu started by hand (the agent's dry-run
argv), which is what the machine's cores allow. The agent must not serialize boots:
its create requests return at once, its qemus start together, and its ratio (all at
once / one alone) matches the bare ratio. Order: bare alone, agent alone, agent all at
once, bare all at once (so drift hits both alike).

    python3 bench/parallel_create.py [--n 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (AgentProcess, BareVM, emit, keypair, log, machine,  # noqa: E402
                    running_agent, wait_ready_bare, workdir)

SPEC = {"image": "test", "cpus": 2, "memory": "1G", "disk": "4G"}
GOAL = 1.05    # agent ratio / bare ratio


def agent_one(agent: AgentProcess, key: Path) -> Callable[[str, float], dict]:
    def run(name: str, t0: float) -> dict:
        st = agent.ok("POST", "/vms", {"name": name, **SPEC,
                                       "ssh_keys": [key.with_suffix(".pub").read_text()]})
        out = {"request_s": round(time.monotonic() - t0, 3),
               "qemu_started_at": st["boot"]["started_at"]}
        pid = st["pid"]
        got = wait_ready_bare(st["ssh_port"], key, t0,
                              lambda: Path(f"/proc/{pid}").exists())
        return {**out, **got}
    return run


def bare_one(agent: AgentProcess, work: Path, key: Path) -> tuple[Callable, list]:
    made: list[BareVM] = []
    prepared: dict[str, BareVM] = {}

    def prepare(name: str) -> None:      # the dry run is not timed
        vm = BareVM(agent, work, name, {**SPEC, "ssh_keys": [key.with_suffix(".pub")
                                                             .read_text()]})
        prepared[name] = vm
        made.append(vm)

    def run(name: str, t0: float) -> dict:
        vm = prepared[name]
        vm.start()
        out = {"request_s": round(time.monotonic() - t0, 3), "qemu_started_at": time.time()}
        return {**out, **wait_ready_bare(vm.port, key, t0, vm.alive)}
    run.prepare = prepare            # type: ignore[attr-defined]
    return run, made


def batch(names: list[str], one: Callable[[str, float], dict]) -> dict:
    """Start all at once (threads released together); time until every login works."""
    out: dict = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(names) + 1)

    def worker(name: str) -> None:
        go.wait()
        try:
            out[name] = one(name, t0)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    go.wait()
    for t in threads:
        t.join()
    total = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(names)} creates failed") from errors[0]
    starts = [d["qemu_started_at"] for d in out.values()]
    return {"total_s": round(total, 2),
            "create_request_s_max": max(d["request_s"] for d in out.values()),
            "qemu_start_spread_s": round(max(starts) - min(starts), 3),
            "per_vm_ssh_s": {k: round(v["total_s"], 2) for k, v in out.items()},
            "per_vm": {k: {kk: (round(vv, 2) if isinstance(vv, float) else vv)
                           for kk, vv in v.items() if kk != "qemu_started_at"}
                       for k, v in out.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="2 at once, agent and bare; no one-alone runs")
    args = p.parse_args()
    n = 2 if args.quick else max(2, args.n)
    mach = machine()
    res: dict[str, dict | None] = {}
    with workdir("bench-par-") as work, running_agent(work) as agent:
        key = keypair(work)
        agent_run = agent_one(agent, key)
        bare_run, bare_made = bare_one(agent, work, key)
        plan = [("bare_alone", "bare", ["b-solo"]), ("agent_alone", "agent", ["a-solo"]),
                ("agent_all", "agent", [f"a{i}" for i in range(n)]),
                ("bare_all", "bare", [f"b{i}" for i in range(n)])]
        for label, kind, names in plan:
            if args.quick and label.endswith("_alone"):
                res[label] = None
                continue
            log(f"{label}: {len(names)} VM(s)")
            if kind == "bare":
                for name in names:
                    bare_run.prepare(name)
            try:
                res[label] = batch(names, agent_run if kind == "agent" else bare_run)
            finally:
                if kind == "agent":
                    for name in names:
                        agent.call("DELETE", f"/vms/{name}")
                else:
                    for vm in bare_made:
                        vm.stop()
                    bare_made.clear()
            log(f"  {res[label]['total_s']}s")

    def ratio(kind: str) -> float | None:
        alone, every = res[f"{kind}_alone"], res[f"{kind}_all"]
        return round(every["total_s"] / alone["total_s"], 3) if alone else None
    agent_ratio, bare_ratio = ratio("agent"), ratio("bare")
    rel = round(agent_ratio / bare_ratio, 3) if agent_ratio and bare_ratio else None
    every = res["agent_all"]
    emit({"benchmark": "parallel_create", "machine": mach, "n": n, "spec": SPEC,
          "one_alone_s": res["agent_alone"]["total_s"] if res["agent_alone"] else None,
          "all_at_once_s": every["total_s"],
          "ratio": agent_ratio,
          "bare_one_alone_s": res["bare_alone"]["total_s"] if res["bare_alone"] else None,
          "bare_all_at_once_s": res["bare_all"]["total_s"],
          "bare_ratio": bare_ratio,
          "agent_ratio_over_bare_ratio": rel, "goal": GOAL,
          "goal_met": rel <= GOAL if rel else None,
          "create_request_s_max": every["create_request_s_max"],
          "qemu_start_spread_s": every["qemu_start_spread_s"],
          "per_vm_ssh_s": every["per_vm_ssh_s"], "detail": res,
          "note": f"{n} TCG guests of {SPEC['cpus']} vCPUs share "
                  f"{mach['cores']} cores"})


if __name__ == "__main__":
    main()
