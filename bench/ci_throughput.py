"""CI throughput: jobs per minute of ``vmctl run ... -- echo first-line`` (a job that
does nothing but answer), sequential and 2 in parallel, warm-started from a template
and taken from a warm pool (size 2), against cold-booted VMs in the same run on the
same agent (a cold job: ``vmctl create`` from the image, ``vmctl ssh NAME -- true``,
``vmctl delete``). Also the time from starting ``vmctl run`` to the job's first output
line (measured outside vmctl, on its stdout); the goal from a pool is under 1 s.

A pool job that finds the pool empty waits for the refill (vmctl run does), so the
pool's throughput includes its refill rate; "from a ready pool" are the jobs that
found a ready member.

    python3 bench/ci_throughput.py [--jobs 4] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BOOT_TIMEOUT, AgentProcess, ROOT, emit, log, machine,  # noqa: E402
                    median, running_agent, vmctl, vmctl_env, workdir)

SPEC = {"image": "test", "cpus": 2, "memory": "1G", "disk": "4G"}
TEMPLATE = "ci-bench"
POOL = "ci-bench"
POOL_SIZE = 2
GOAL_POOL_FIRST_OUTPUT_S = 1.0
MARK = "first-line"


def job(agent: AgentProcess, source: list[str]) -> dict:
    """One ``vmctl run``: its wall time, when its first line came, its exit code."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "vmctl", "run", "-q", *source,
                             "--timeout", "10m", "--", f"echo {MARK}"],
                            env=vmctl_env(agent), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    first = None
    for line in proc.stdout:
        if first is None and line.strip() == MARK:
            first = time.monotonic() - t0
    err = proc.stderr.read()
    code = proc.wait()
    if code != 0:
        raise RuntimeError(f"vmctl run {' '.join(source)} failed ({code}): {err[-1500:]}")
    return {"wall_s": round(time.monotonic() - t0, 3),
            "first_output_s": round(first, 3) if first is not None else None}


def series(agent: AgentProcess, source: list[str], jobs: int, parallel: int,
           before_each: callable = None) -> dict:
    """``jobs`` jobs, ``parallel`` at a time: jobs per minute and each job's figures."""
    results: list[dict] = []
    lock = threading.Lock()
    left = list(range(jobs))

    def worker() -> None:
        while True:
            with lock:
                if not left:
                    return
                left.pop()
            res = job(agent, source)
            with lock:
                results.append(res)
    if before_each is not None:
        before_each()
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    firsts = [r["first_output_s"] for r in results if r["first_output_s"] is not None]
    return {"jobs": jobs, "parallel": parallel, "elapsed_s": round(elapsed, 2),
            "jobs_per_minute": round(jobs / elapsed * 60, 2),
            "first_output_median_s": median(firsts, 3), "detail": results}


def cold_job(agent: AgentProcess, name: str) -> dict:
    t0 = time.monotonic()
    vmctl(agent, "create", name, "--image", SPEC["image"], "--cpus", str(SPEC["cpus"]),
          "--memory", SPEC["memory"], "--disk", SPEC["disk"], "--timeout",
          str(BOOT_TIMEOUT))
    vmctl(agent, "ssh", name, "--", "true")
    vmctl(agent, "delete", name, "--yes")
    wall = time.monotonic() - t0
    return {"wall_s": round(wall, 2), "jobs_per_minute": round(60 / wall, 3)}


def pool_ready(agent: AgentProcess, n: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while agent.ok("GET", f"/pools/{POOL}")["ready"] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {POOL} did not reach {n} ready")
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=4, help="jobs per series (default 4)")
    p.add_argument("--quick", action="store_true",
                   help="2 jobs per series, one cold boot")
    args = p.parse_args()
    jobs = 2 if args.quick else max(2, args.jobs)
    mach = machine()
    out: dict = {"benchmark": "ci_throughput", "machine": mach, "spec": SPEC,
                 "jobs_per_series": jobs, "pool_size": POOL_SIZE}
    with workdir("bench-ci-") as work, running_agent(work) as agent:
        log("template: vmctl template create")
        t0 = time.monotonic()
        vmctl(agent, "template", "create", TEMPLATE, "--image", SPEC["image"], "--cpus",
              str(SPEC["cpus"]), "--memory", SPEC["memory"], "--disk", SPEC["disk"])
        out["template_create_s"] = round(time.monotonic() - t0, 2)
        cold_runs = 1 if args.quick else 2
        cold = [cold_job(agent, f"cold{i}") for i in range(cold_runs)]
        out["cold"] = {"runs": cold, "jobs_per_minute": round(
            60 / median([c["wall_s"] for c in cold]), 3)}
        log(f"  cold: {cold}")
        tpl = ["--template", TEMPLATE]
        out["template_sequential"] = series(agent, tpl, jobs, 1)
        log(f"  template sequential: {out['template_sequential']['jobs_per_minute']}/min")
        out["template_parallel2"] = series(agent, tpl, jobs, 2)
        log(f"  template 2 parallel: {out['template_parallel2']['jobs_per_minute']}/min")
        vmctl(agent, "pool", "create", POOL, "--template", TEMPLATE, "--size",
              str(POOL_SIZE))
        t0 = time.monotonic()
        pool_ready(agent, POOL_SIZE)
        out["pool_fill_s"] = round(time.monotonic() - t0, 2)
        pool = ["--pool", POOL]
        # from a ready pool: each job takes a member while one is ready
        ready_runs = [job(agent, pool) for _ in range(1)]
        pool_ready(agent, POOL_SIZE)
        ready_runs += [job(agent, pool) for _ in range(1)]
        out["pool_ready_first_output_s"] = [r["first_output_s"] for r in ready_runs]
        out["pool_ready_wall_s"] = [r["wall_s"] for r in ready_runs]
        pool_ready(agent, POOL_SIZE)
        out["pool_sequential"] = series(agent, pool, jobs, 1)
        log(f"  pool sequential: {out['pool_sequential']['jobs_per_minute']}/min")
        pool_ready(agent, POOL_SIZE)
        out["pool_parallel2"] = series(agent, pool, jobs, 2)
        log(f"  pool 2 parallel: {out['pool_parallel2']['jobs_per_minute']}/min")
        vmctl(agent, "pool", "rm", POOL, "--yes")
        for vm in agent.ok("GET", "/vms")["vms"]:
            agent.ok("DELETE", f"/vms/{vm['name']}")
        agent.ok("DELETE", f"/templates/{TEMPLATE}")
    best = median(out["pool_ready_first_output_s"], 3)
    out.update({
        "cold_jobs_per_minute": out["cold"]["jobs_per_minute"],
        "template_jobs_per_minute": out["template_sequential"]["jobs_per_minute"],
        "pool_jobs_per_minute": out["pool_sequential"]["jobs_per_minute"],
        "pool_first_output_s": best,
        "template_first_output_s": out["template_sequential"]["first_output_median_s"],
        "goal_pool_first_output_s": GOAL_POOL_FIRST_OUTPUT_S,
        "goal_met": best is not None and best < GOAL_POOL_FIRST_OUTPUT_S})
    emit(out)


if __name__ == "__main__":
    main()
