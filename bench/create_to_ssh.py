"""Create-to-SSH: `vmctl create --wait` + an SSH login running `true`, against bare qemu
started by hand with the same argv (from the agent's dry run), seed, overlay and
networking, polled the same way. Runs alternate; medians and the ratio are reported.

    python3 bench/create_to_ssh.py [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (AgentProcess, emit, free_port, kill_under, machine,  # noqa: E402
                    median, vmctl, wait_ssh_login, keypair)

from vmagent.seed import write_seed_iso  # noqa: E402

SPEC = {"image": "test", "cpus": 2, "memory": "1G", "disk": "4G"}


def agent_run(agent: AgentProcess, name: str, key: Path) -> float:
    t0 = time.monotonic()
    vmctl(agent, "--json", "create", name, "--image", SPEC["image"], "--cpus",
          str(SPEC["cpus"]), "--memory", SPEC["memory"], "--disk", SPEC["disk"],
          "--ssh-key", str(key.with_suffix(".pub")), "--timeout", "900")
    port = agent.ok("GET", f"/vms/{name}")["ssh_port"]
    done = wait_ssh_login(port, key)
    vmctl(agent, "delete", name, "--yes")
    return done - t0


def bare_run(agent: AgentProcess, work: Path, key: Path, i: int) -> float:
    """The same VM by hand: the agent's dry-run argv with this run's own paths."""
    doc = agent.ok("POST", "/vms", {"name": f"bare{i}", **SPEC, "dry_run": True,
                                    "ssh_keys": [key.with_suffix(".pub").read_text()]})
    run_dir = work / f"bare{i}"
    run_dir.mkdir()
    agent_dir = str(agent.state_dir / "vms" / f"bare{i}")
    old_port = next(a for a in doc["argv"] if "hostfwd=" in a).split("127.0.0.1:")[1]
    old_port = old_port.split("-")[0]
    port = free_port()
    argv = [a.replace(agent_dir, str(run_dir)).replace(f"127.0.0.1:{old_port}-",
                                                        f"127.0.0.1:{port}-")
            for a in doc["argv"]]
    image = agent.ok("GET", "/images")["images"][0]
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    image["path"], str(run_dir / "disk.qcow2"), "4G"], check=True)
    write_seed_iso(run_dir / "seed.iso", {k: v.encode() for k, v in doc["seed"].items()})
    subprocess.run(argv, cwd=run_dir, check=True)
    try:
        done = wait_ssh_login(port, key)
    finally:
        pid = int((run_dir / "qemu.pid").read_text())
        subprocess.run(["kill", "-9", str(pid)], check=False)
    return done - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one run of each")
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
    with tempfile.TemporaryDirectory(prefix="bench-c2s-") as tmp:
        work = Path(tmp)
        agent = AgentProcess(work / "state").start()
        try:
            agent.import_test_image()
            key = keypair(work)
            agent_t, bare_t, ratios = [], [], []
            for i in range(runs):
                # alternate which goes first, so drift on the machine hits both alike
                pair = [("agent", lambda: agent_run(agent, f"vm{i}", key)),
                        ("bare", lambda: bare_run(agent, work, key, i))]
                if i % 2:
                    pair.reverse()
                got = {k: f() for k, f in pair}
                agent_t.append(got["agent"])
                bare_t.append(got["bare"])
                ratios.append(got["agent"] / got["bare"])
        finally:
            agent.stop()
            kill_under(work)
    emit({"benchmark": "create_to_ssh", "machine": machine(), "runs": runs,
          "agent_seconds": [round(t, 2) for t in agent_t],
          "bare_seconds": [round(t, 2) for t in bare_t],
          "agent_median": median(agent_t), "bare_median": median(bare_t),
          "ratio_median": median(ratios), "goal_ratio": 1.05})


if __name__ == "__main__":
    main()
