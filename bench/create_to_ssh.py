"""Create-to-SSH: `vmctl create` (ready when its login works) and then `vmctl ssh NAME --
true`, against the guest's own limit: a minimal qemu (qemu's default machine and CPU
model, a virtio disk, the same seed contents as a second virtio disk, a virtio NIC, no
other device; bench/common.py's MinimalVM) on an overlay of the same base, logged into
with the injected key as soon as sshd answers (its banner polled once a second, as the
agent's watcher does). Runs alternate (A B, B A, ...); the medians, the ratio of the
medians (the goal: within 1.10x) and the median of the pairwise ratios are reported,
with the phases of every boot from its console (kernel, userspace, cloud-init's local
and network stages, sshd started, cloud-init's config and final stages, its end), the
SSH banner and the login, so that the time between the two paths can be placed.

With --argv-baseline a third run per round starts bare qemu with the agent's own argv
(its dry run, with this run's own paths and port) polled the same way as the minimal
one: the difference to the agent is what the agent and vmctl add, the difference to
the minimal one what the command line (machine, CPU model, devices) costs.

    python3 bench/create_to_ssh.py [--runs 5] [--argv-baseline] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BOOT_TIMEOUT, AgentProcess, BareVM, MinimalVM, Observer,  # noqa: E402
                    emit, keypair, log, machine, median, running_agent, vmctl,
                    wait_ready_bare, workdir)

SPEC = {"image": "test", "cpus": 2, "memory": "1G", "disk": "4G"}
GOAL = 1.10
_PHASE = re.compile(r"^\S+: (.+?)\s+([\d.]+)s$")


def agent_run(agent: AgentProcess, name: str, key: Path) -> dict:
    """vmctl create (waits until its own login works), then `vmctl ssh NAME -- true`
    (a channel on the connection the create's login left open)."""
    console = agent.state_dir / "vms" / name / "console.log"
    t0 = time.monotonic()
    obs = Observer(console, t0, lambda: agent.ok("GET", f"/vms/{name}")["ssh_ready"])
    obs.start()
    try:
        res = vmctl(agent, "create", name, "--image", SPEC["image"], "--cpus",
                    str(SPEC["cpus"]), "--memory", SPEC["memory"], "--disk", SPEC["disk"],
                    "--ssh-key", str(key.with_suffix(".pub")),
                    "--timeout", str(BOOT_TIMEOUT))
        created = time.monotonic()
        vmctl(agent, "ssh", name, "--", "true", timeout=120)
        done = time.monotonic()
    finally:
        seen = obs.stop()
    # vmctl's milestones (seconds since vmctl started waiting), from its stderr lines
    phases = {m.group(1): float(m.group(2)) for m in
              (_PHASE.match(ln.strip()) for ln in res.stderr.splitlines()) if m}
    vmctl(agent, "delete", name, "--yes")
    return {"total_s": round(done - t0, 2), "vmctl_create_s": round(created - t0, 2),
            "ssh_true_after_s": round(done - created, 2), "vmctl_phases": phases, **seen}


def qemu_run(vm: BareVM, key: Path) -> dict:
    """Start ``vm`` by hand, poll its SSH banner, log in running `true`."""
    try:
        t0 = time.monotonic()
        obs = Observer(vm.run_dir / "console.log", t0)
        obs.start()
        try:
            vm.start()
            started = time.monotonic()
            got = wait_ready_bare(vm.port, key, t0, vm.alive)
        finally:
            seen = obs.stop()
        got["total_s"] = round(got["total_s"], 2)
        return {**got, "qemu_started_s": round(started - t0, 3), **seen}
    finally:
        vm.stop()


PROFILE = ("kernel_s", "userspace_s", "init_local_s", "init_s", "sshd_started_s",
           "banner_s", "agent_ssh_ready_s", "login_s", "vmctl_create_s",
           "modules_config_s", "modules_final_s", "cloud_init_done_s", "total_s")


def profile(runs: list[dict]) -> dict:
    """The median time of each phase of these runs (those seen in every one)."""
    return {k: median([r[k] for r in runs], 2) for k in PROFILE
            if runs and all(k in r for r in runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--argv-baseline", action="store_true",
                   help="also bare qemu with the agent's argv in every round")
    p.add_argument("--quick", action="store_true", help="one round")
    args = p.parse_args()
    runs = 1 if args.quick else max(1, args.runs)
    kinds = ["agent", "minimal"] + (["argv"] if args.argv_baseline else [])
    mach = machine()
    detail: list[dict] = []
    spec_keys = {**SPEC}
    with workdir("bench-c2s-") as work, running_agent(work) as agent:
        key = keypair(work)
        spec_keys["ssh_keys"] = [key.with_suffix(".pub").read_text()]
        for i in range(runs):
            # rotate which goes first, so drift on the machine hits all alike
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
            if len(kinds) == 2 and i % 2:
                order = kinds[::-1]
            rnd: dict = {"order": order}
            for kind in order:
                log(f"run {i + 1}/{runs}: {kind}")
                if kind == "agent":
                    rnd[kind] = agent_run(agent, f"vm{i}", key)
                elif kind == "minimal":
                    rnd[kind] = qemu_run(MinimalVM(agent, work, f"min{i}", spec_keys), key)
                else:
                    rnd[kind] = qemu_run(BareVM(agent, work, f"bare{i}", spec_keys), key)
                log(f"  {kind}: {rnd[kind]['total_s']:.1f}s")
            detail.append(rnd)
            # each round as one line too: a run cut short keeps what it measured
            log(f"round {i + 1}: {json.dumps(rnd)}")
    total = {kind: [d[kind]["total_s"] for d in detail] for kind in kinds}
    ratios = [a / b for a, b in zip(total["agent"], total["minimal"])]
    doc = {"benchmark": "create_to_ssh", "machine": mach, "runs": runs, "spec": SPEC,
           "agent_seconds": total["agent"], "minimal_seconds": total["minimal"],
           "pair_ratios": [round(r, 3) for r in ratios],
           "agent_median": median(total["agent"], 2),
           "minimal_median": median(total["minimal"], 2),
           "ratio_of_medians": round(median(total["agent"]) / median(total["minimal"]), 3),
           "ratio_median": median(ratios, 3), "goal_ratio": GOAL,
           "goal_met": median(total["agent"]) / median(total["minimal"]) <= GOAL,
           "profile_median_s": {kind: profile([d[kind] for d in detail])
                                for kind in kinds}}
    if "argv" in kinds:
        doc.update({"argv_seconds": total["argv"], "argv_median": median(total["argv"], 2),
                    "agent_over_argv": round(median(total["agent"]) /
                                             median(total["argv"]), 3),
                    "argv_over_minimal": round(median(total["argv"]) /
                                               median(total["minimal"]), 3)})
    doc["runs_detail"] = detail
    emit(doc)


if __name__ == "__main__":
    main()
