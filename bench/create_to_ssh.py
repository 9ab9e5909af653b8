"""Create-to-SSH: `vmctl create --wait` and then an SSH login running `true`, against
bare qemu started by hand with the same argv (the agent's dry run, with this run's own
paths and port), the same seed contents and an overlay on the same base, polled the
same way: the SSH banner once a second, a first login, cloud-init's end (vmctl waits
for it: it restarts sshd while it configures the guest), a login (vmctl's), then the
login running `true`. Runs alternate (A B, B A, ...); the medians of both, the ratio of
the medians and the median of the pairwise ratios are reported, with the phases of
every run. Since the guest's boot time varies a lot on a shared machine (the same in
both paths), the time from cloud-init's end to the final login is reported too: its
difference is what the tool adds after the guest is ready.

    python3 bench/create_to_ssh.py [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BOOT_TIMEOUT, AgentProcess, BareVM, Observer, emit,  # noqa: E402
                    keypair, log, machine, median, running_agent, ssh_login_retry,
                    vmctl, wait_ready_bare, workdir)

SPEC = {"image": "test", "cpus": 2, "memory": "1G", "disk": "4G"}
GOAL = 1.05
_PHASE = re.compile(r"^\S+: (.+?)\s+([\d.]+)s$")


def agent_run(agent: AgentProcess, name: str, key: Path) -> dict:
    """vmctl create (waits until its own login works), then one more login."""
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
        port = agent.ok("GET", f"/vms/{name}")["ssh_port"]
        done, attempts = ssh_login_retry(port, key, time.monotonic() + 120)
    finally:
        seen = obs.stop()
    # vmctl's milestones (seconds since vmctl started waiting), from its stderr lines
    phases = {m.group(1): float(m.group(2)) for m in
              (_PHASE.match(ln.strip()) for ln in res.stderr.splitlines()) if m}
    vmctl(agent, "delete", name, "--yes")
    return {"total_s": done - t0, "vmctl_create_s": round(created - t0, 2),
            "login_after_s": round(done - created, 2), "login_attempts": attempts,
            "vmctl_phases": phases, **seen}


def bare_run(agent: AgentProcess, work: Path, key: Path, name: str) -> dict:
    vm = BareVM(agent, work, name, {**SPEC, "ssh_keys": [key.with_suffix(".pub")
                                                         .read_text()]})
    try:
        t0 = time.monotonic()
        obs = Observer(vm.run_dir / "console.log", t0)
        obs.start()
        try:
            vm.start()
            started = time.monotonic()
            got = wait_ready_bare(vm.port, key, t0, vm.alive)
            # vmctl's readiness is stricter: SSH answers *and* cloud-init finished (it
            # restarts sshd while it configures the guest). The same by hand: wait for
            # cloud-init's end in the console log, then log in again.
            obs.wait_for("cloud_init_done_s", BOOT_TIMEOUT)
            ready, _ = ssh_login_retry(vm.port, key, time.monotonic() + 120)
            # then the login the agent path makes after vmctl create returns
            done, _ = ssh_login_retry(vm.port, key, time.monotonic() + 120)
            got["ready_s"] = round(ready - t0, 2)
            got["cloud_init_login_s"] = done - t0
        finally:
            seen = obs.stop()
        return {**got, "qemu_started_s": round(started - t0, 3), **seen}
    finally:
        vm.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="pairs of runs (default 3)")
    p.add_argument("--quick", action="store_true", help="one pair")
    args = p.parse_args()
    runs = 1 if args.quick else max(1, args.runs)
    mach = machine()
    detail: list[dict] = []
    with workdir("bench-c2s-") as work, running_agent(work) as agent:
        key = keypair(work)
        for i in range(runs):
            # alternate which goes first, so drift on the machine hits both alike
            order = ["agent", "bare"] if i % 2 == 0 else ["bare", "agent"]
            pair: dict = {"order": order}
            for kind in order:
                log(f"run {i + 1}/{runs}: {kind}")
                pair[kind] = (agent_run(agent, f"vm{i}", key) if kind == "agent"
                              else bare_run(agent, work, key, f"bare{i}"))
                log(f"  {kind}: {pair[kind]['total_s']:.1f}s")
            detail.append(pair)
    # the baseline is polled the way vmctl polls: SSH answering, cloud-init finished
    # (from the console log), then a login running `true`; the first login by hand
    # (before cloud-init ends) is reported too, to show what that wait costs
    agent_t = [d["agent"]["total_s"] for d in detail]
    bare_t = [d["bare"]["cloud_init_login_s"] for d in detail]
    bare_first = [d["bare"]["total_s"] for d in detail]
    ratios = [a / b for a, b in zip(agent_t, bare_t)]
    for d in detail:
        for kind in ("agent", "bare"):
            d[kind]["total_s"] = round(d[kind]["total_s"], 2)
        d["bare"]["cloud_init_login_s"] = round(d["bare"]["cloud_init_login_s"], 2)
    # where the agent path spends its time after SSH first answers: cloud-init's end
    # (vmctl waits for it) and the logins after it
    gap = [d["agent"]["vmctl_create_s"] - d["agent"]["agent_ssh_ready_s"]
           for d in detail if "agent_ssh_ready_s" in d["agent"]]
    # the guest's boot varies by tens of seconds on a shared machine, the same in both
    # paths; what the tool adds shows in the time from cloud-init's end to the login
    done_key = {"agent": "total_s", "bare": "cloud_init_login_s"}
    after = {kind: [d[kind][done_key[kind]] - d[kind]["cloud_init_done_s"] for d in detail
                    if "cloud_init_done_s" in d[kind]] for kind in ("agent", "bare")}
    # and the guest's own boot: from qemu's start to cloud-init's end
    boot = {kind: [d[kind]["cloud_init_done_s"] for d in detail
                   if "cloud_init_done_s" in d[kind]] for kind in ("agent", "bare")}
    before = [d["agent"]["kernel_s"] - d["bare"]["kernel_s"] for d in detail
              if "kernel_s" in d["agent"] and "kernel_s" in d["bare"]]
    emit({"benchmark": "create_to_ssh", "machine": mach, "runs": runs, "spec": SPEC,
          "after_cloud_init_agent_s": [round(t, 2) for t in after["agent"]],
          "after_cloud_init_bare_s": [round(t, 2) for t in after["bare"]],
          "agent_extra_after_cloud_init_median_s": round(
              median(after["agent"]) - median(after["bare"]), 2) if after["bare"] else None,
          "agent_extra_to_kernel_median_s": median(before, 2) if before else None,
          "cloud_init_done_agent_s": [round(t, 2) for t in boot["agent"]],
          "cloud_init_done_bare_s": [round(t, 2) for t in boot["bare"]],
          "agent_seconds": [round(t, 2) for t in agent_t],
          "bare_seconds": [round(t, 2) for t in bare_t],
          "pair_ratios": [round(r, 3) for r in ratios],
          "agent_median": median(agent_t, 2), "bare_median": median(bare_t, 2),
          "ratio_of_medians": round(median(agent_t) / median(bare_t), 3),
          "ratio_median": median(ratios, 3), "goal_ratio": GOAL,
          "goal_met": median(ratios) <= GOAL,
          "bare_first_login_seconds": [round(t, 2) for t in bare_first],
          "bare_first_login_median": median(bare_first, 2),
          "agent_ssh_ready_to_create_done_median": median(gap, 2),
          "runs_detail": detail})


if __name__ == "__main__":
    main()
