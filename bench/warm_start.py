"""Warm start against cold boot: create -> SSH login, in the same run on the same agent.

Cold: ``vmctl create`` from the image (waits until its own login works), then
``vmctl ssh NAME -- true`` (a channel on the connection that login left open,
vmctl/sshmaster.py). Template: ``vmctl template create`` from the same image and spec (a
cold boot plus the state save; reported, not part of the ratio). Warm: ``vmctl create
--template`` (waits until its own login works), then ``vmctl ssh NAME -- true``; and
the same through the bare API (POST /v1/vms with ``template``, then one plain SSH login
running ``true``), which shows what the agent itself costs without vmctl. The goal: warm
through vmctl at most 3% of cold (median of the warm runs over the cold run).

    python3 bench/warm_start.py [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BOOT_TIMEOUT, AgentProcess, emit, keypair, log,  # noqa: E402
                    machine, median, running_agent, ssh_login_retry, vmctl, workdir)

SPEC = {"image": "test", "cpus": 2, "memory": "1G", "disk": "4G"}
TEMPLATE = "bench-tpl"
GOAL = 0.03


def _spec_args() -> list[str]:
    return ["--image", SPEC["image"], "--cpus", str(SPEC["cpus"]), "--memory",
            SPEC["memory"], "--disk", SPEC["disk"]]


def cold_run(agent: AgentProcess, name: str, key: Path) -> dict:
    t0 = time.monotonic()
    vmctl(agent, "create", name, *_spec_args(), "--ssh-key", str(key.with_suffix(".pub")),
          "--timeout", str(BOOT_TIMEOUT))
    created = time.monotonic()
    vmctl(agent, "ssh", name, "--", "true", timeout=120)
    done = time.monotonic()
    vmctl(agent, "delete", name, "--yes")
    return {"total_s": round(done - t0, 2), "vmctl_create_s": round(created - t0, 2),
            "ssh_true_s": round(done - created, 2)}


def warm_vmctl_run(agent: AgentProcess, name: str, key: Path) -> dict:
    t0 = time.monotonic()
    vmctl(agent, "create", name, "--template", TEMPLATE, "--ssh-key",
          str(key.with_suffix(".pub")), "--timeout", "300")
    created = time.monotonic()
    vmctl(agent, "ssh", name, "--", "true", timeout=120)
    done = time.monotonic()
    return {"total_s": round(done - t0, 2), "vmctl_create_s": round(created - t0, 2),
            "ssh_true_s": round(done - created, 2)}


def warm_api_run(agent: AgentProcess, name: str, key: Path) -> dict:
    t0 = time.monotonic()
    doc = agent.ok("POST", "/vms", {"name": name, "template": TEMPLATE,
                                    "ssh_keys": [key.with_suffix(".pub").read_text()]})
    created = time.monotonic()
    done, attempts = ssh_login_retry(doc["ssh_port"], key, time.monotonic() + BOOT_TIMEOUT)
    return {"total_s": round(done - t0, 2), "create_request_s": round(created - t0, 2),
            "login_attempts": attempts, "agent_timings": doc.get("warm")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="warm runs of each kind (default 3)")
    p.add_argument("--quick", action="store_true", help="one warm run of each kind")
    args = p.parse_args()
    runs = 1 if args.quick else max(1, args.runs)
    mach = machine()
    with workdir("bench-warm-") as work, running_agent(work) as agent:
        key = keypair(work)
        log("cold: vmctl create from the image")
        cold = cold_run(agent, "cold0", key)
        log(f"  cold: {cold['total_s']:.1f}s")
        log("template: vmctl template create")
        t0 = time.monotonic()
        vmctl(agent, "template", "create", TEMPLATE, *_spec_args(), "--ssh-key",
              str(key.with_suffix(".pub")))
        template_s = round(time.monotonic() - t0, 2)
        tpl = agent.ok("GET", f"/templates/{TEMPLATE}")
        log(f"  template: {template_s:.1f}s, state {tpl['state_size'] >> 20} MiB")
        warm_vmctl, warm_api = [], []
        for i in range(runs):
            # alternate which goes first
            for kind in (("vmctl", "api") if i % 2 == 0 else ("api", "vmctl")):
                name = f"w{kind}{i}"
                log(f"warm {i + 1}/{runs}: {kind}")
                res = (warm_vmctl_run if kind == "vmctl" else warm_api_run)(agent, name, key)
                (warm_vmctl if kind == "vmctl" else warm_api).append(res)
                log(f"  warm {kind}: {res['total_s']:.2f}s")
                # not timed: the next run starts beside no other clone (an idle TCG
                # guest still costs the host CPU)
                agent.ok("DELETE", f"/vms/{name}")
        # what is left (none unless a run failed half-way), then the template (it
        # refuses while clones use it)
        for vm in agent.ok("GET", "/vms")["vms"]:
            agent.ok("DELETE", f"/vms/{vm['name']}")
        agent.ok("DELETE", f"/templates/{TEMPLATE}")
    wv = [r["total_s"] for r in warm_vmctl]
    wa = [r["total_s"] for r in warm_api]
    ratio = median(wv) / cold["total_s"]
    emit({"benchmark": "warm_start", "machine": mach, "runs": runs, "spec": SPEC,
          "cold_seconds": cold["total_s"], "cold_detail": cold,
          "template_create_seconds": template_s,
          "template_build_seconds": tpl["build_seconds"],
          "template_save_seconds": tpl["save_seconds"],
          "state_size": tpl["state_size"],
          "warm_vmctl_seconds": wv, "warm_vmctl_median": median(wv, 2),
          "warm_api_seconds": wa, "warm_api_median": median(wa, 2),
          "warm_over_cold": round(ratio, 4),
          "warm_api_over_cold": round(median(wa) / cold["total_s"], 4),
          "goal_ratio": GOAL, "goal_met": ratio <= GOAL,
          "warm_vmctl_detail": warm_vmctl, "warm_api_detail": warm_api})


if __name__ == "__main__":
    main()
