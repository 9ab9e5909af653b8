"""The agent's own cost: `vmctl list --json` wall time (and the raw GET /v1/vms it makes)
with 20 VMs defined and all stopped, then with 3 of them running; the agent's RSS; its
CPU time over a window (60 s) with the 3 VMs running and booted (its 1 Hz watcher
included). VMs have 512M of memory each. `vmctl --version` (a whole vmctl process that
makes no request) is timed too: the floor under any vmctl command; and under that the
interpreter's own start (`python3 -c pass`, same interpreter and site-packages), the
floor under any Python program on this machine.

    python3 bench/agent_cost.py [--vms 20] [--running 3] [--window 60] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BOOT_TIMEOUT, AgentProcess, cpu_seconds, emit, log,  # noqa: E402
                    machine, median, rss_kib, running_agent, vmctl, workdir)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def list_times(agent: AgentProcess, n: int, expect: int) -> dict:
    cli, after, api, floor, python = [], [], [], [], []
    for _ in range(n):
        res = []
        cli.append(wall(lambda: res.append(vmctl(agent, "--json", "list"))))
        after.append(wall(lambda: vmctl(agent, "list", "--json")))
        api.append(wall(lambda: agent.ok("GET", "/vms")))
        floor.append(wall(lambda: vmctl(agent, "--version")))
        python.append(wall(lambda: subprocess.run([sys.executable, "-c", "pass"],
                                                  check=True)))
    assert res[0].stdout.count('"name"') >= expect, res[0].stdout[:500]
    return {"vmctl_list_json_ms": round(median(cli) * 1000, 1),
            "vmctl_list_json_ms_min": round(min(cli) * 1000, 1),
            "vmctl_list_json_after_ms": round(median(after) * 1000, 1),
            "vmctl_version_ms": round(median(floor) * 1000, 1),
            "vmctl_version_ms_min": round(min(floor) * 1000, 1),
            "python_start_ms": round(median(python) * 1000, 1),
            "python_start_ms_min": round(min(python) * 1000, 1),
            # a list costs what starting vmctl costs: ~1.0 means the request is free
            "vmctl_list_over_version": round(median(cli) / median(floor), 2),
            "api_list_ms": round(median(api) * 1000, 2),
            "api_list_ms_stdev": round(statistics.pstdev(api) * 1000, 2),
            "repeats": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=20)
    p.add_argument("--running", type=int, default=3)
    p.add_argument("--window", type=float, default=60)
    p.add_argument("--quick", action="store_true",
                   help="3 VMs, 1 running (not waited for), a 5 s window")
    args = p.parse_args()
    if args.quick:
        args.vms, args.running, args.window = 3, 1, 5
    args.running = min(args.running, args.vms)
    reps = 3 if args.quick else 15
    mach = machine()
    with workdir("bench-cost-") as work, running_agent(work) as agent:
        pid = agent.proc.pid
        rss_empty = rss_kib(pid)
        create_ms = []
        for i in range(args.vms):
            create_ms.append(wall(lambda: agent.ok("POST", "/vms", {
                "name": f"vm{i}", "image": "test", "memory": "512M", "start": False})))
        log(f"{args.vms} VMs defined; timing list")
        stopped = list_times(agent, reps, args.vms)
        rss_stopped = rss_kib(pid)
        for i in range(args.running):
            agent.ok("POST", f"/vms/vm{i}/start")
        # measure the steady state: booting TCG guests starve everything of CPU
        if not args.quick:
            for i in range(args.running):
                log(f"waiting for vm{i}")
                agent.wait_ready(f"vm{i}", timeout=BOOT_TIMEOUT)
        log("timing list with VMs running")
        running = list_times(agent, reps, args.vms)
        log(f"agent CPU over {args.window:g}s")
        c0, cc0, t0 = cpu_seconds(pid), cpu_seconds(pid, children=True), time.monotonic()
        time.sleep(args.window)
        cpu, cpu_all = cpu_seconds(pid) - c0, cpu_seconds(pid, children=True) - cc0
        window = time.monotonic() - t0
        doc = {"benchmark": "agent_cost", "machine": mach, "vms": args.vms,
               "running": args.running, "running_booted": not args.quick,
               "vm_memory": "512M",
               "create_stopped_ms_median": round(median(create_ms) * 1000, 1),
               "list_with_all_stopped": stopped, "list_with_running": running,
               "agent_rss_kib_empty": rss_empty,
               "agent_rss_kib_with_vms_stopped": rss_stopped,
               "agent_rss_kib": rss_kib(pid),
               "agent_rss_peak_kib": status_kib(pid, "VmHWM"),
               "agent_threads": status_kib(pid, "Threads"),
               "agent_cpu_seconds": round(cpu, 3),
               "agent_cpu_seconds_with_children": round(cpu_all, 3),
               "window_seconds": round(window, 1),
               "agent_cpu_percent": round(100 * cpu / window, 2)}
        for i in range(args.vms):
            agent.ok("DELETE", f"/vms/vm{i}")
    emit(doc)


if __name__ == "__main__":
    main()
