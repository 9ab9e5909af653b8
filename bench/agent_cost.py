"""The agent's own cost: `vmctl list --json` wall time with 20 VMs defined (stopped) and
with 3 of them running; the agent's RSS; its CPU time over a window with 3 running VMs
(the 1 Hz watcher included).

    python3 bench/agent_cost.py [--vms 20] [--running 3] [--window 60] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AgentProcess, emit, kill_under, machine, median, vmctl  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def list_times(agent: AgentProcess, n: int) -> dict:
    cli, api = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        vmctl(agent, "--json", "list")
        cli.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        agent.ok("GET", "/vms")
        api.append(time.perf_counter() - t0)
    return {"vmctl_list_json_ms": round(median(cli) * 1000, 1),
            "api_list_ms": round(median(api) * 1000, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vms", type=int, default=20)
    p.add_argument("--running", type=int, default=3)
    p.add_argument("--window", type=float, default=60)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.vms, args.running, args.window = 3, 1, 3
    reps = 3 if args.quick else 15
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        agent = AgentProcess(Path(tmp) / "state").start()
        try:
            agent.import_test_image()
            pid = agent.proc.pid
            rss_empty = rss_kib(pid)
            for i in range(args.vms):
                agent.ok("POST", "/vms", {"name": f"vm{i}", "image": "test",
                                          "memory": "512M", "start": False})
            stopped = list_times(agent, reps)
            for i in range(args.running):
                agent.ok("POST", f"/vms/vm{i}/start")
            # measure the steady state: booting TCG guests starve everything of CPU
            for i in range(args.running):
                if not args.quick:
                    agent.wait_ready(f"vm{i}", timeout=900)
            running = list_times(agent, reps)
            c0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(args.window)
            cpu = cpu_seconds(pid) - c0
            window = time.monotonic() - t0
            doc = {"benchmark": "agent_cost", "machine": machine(), "vms": args.vms,
                   "running": args.running,
                   "list_with_all_stopped": stopped, "list_with_running": running,
                   "agent_rss_kib_empty": rss_empty, "agent_rss_kib": rss_kib(pid),
                   "agent_cpu_seconds": round(cpu, 3), "window_seconds": round(window, 1),
                   "agent_cpu_percent": round(100 * cpu / window, 2)}
            for i in range(args.vms):
                agent.ok("DELETE", f"/vms/vm{i}")
        finally:
            agent.stop()
            kill_under(Path(tmp))
    emit(doc)


if __name__ == "__main__":
    main()
