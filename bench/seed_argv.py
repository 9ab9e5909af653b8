"""Seed ISO build time (vmagent.seed.render_seed + write_seed_iso, pycdlib) and the argv
build time (vmagent.argv.build_argv), per operation in microseconds over many
iterations (the median of 5 rounds); and a whole dry-run create request to a private
agent (spec check, seed render, argv: what `vmctl create --dry-run` waits for).

    python3 bench/seed_argv.py [--n 500] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, running_agent, workdir  # noqa: E402

from vmagent.qemu import argv as qargv  # noqa: E402
from vmagent.identity import seed  # noqa: E402
from vmagent.spec import Defaults, VMSpec, apply_defaults  # noqa: E402

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdM09Ct5ZbpGEQm6BvLA/Ji8N4McDg7RPn/6+OGhCmD b@x"
ROUNDS = 5


def per_op_us(fn, n: int) -> float:
    """Median over ROUNDS rounds of the mean time of one call, in microseconds."""
    fn()
    per_round = max(1, n // ROUNDS)
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        rounds.append((time.perf_counter() - t0) / per_round)
    return round(statistics.median(rounds) * 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="iterations (argv: 10x)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    n = 10 if args.quick else max(ROUNDS, args.n)
    mach = machine()
    spec = apply_defaults(VMSpec.from_dict({
        "name": "bench", "ssh_keys": [KEY], "user_data": "packages: [git, vim]\n"}),
        Defaults(), 2 << 30)
    mac = "52:54:00:00:00:01"
    with workdir("bench-seed-") as work:
        iso = work / "seed.iso"
        files = seed.render_seed(spec, seed.new_instance_id("bench"), mac)
        cfg = qargv.MachineConfig(name="bench", run_dir=work, cpus=2, memory=2 << 30,
                                  accel="tcg", ssh_port=22022, mac=mac,
                                  vmgenid=str(uuid.uuid4()),
                                  kernel_boot=qargv.KernelBoot("/k", "/i", "root=LABEL=rootfs"))

        def build() -> None:
            seed.write_seed_iso(iso, seed.render_seed(spec, "i-1", mac))

        doc = {"benchmark": "seed_argv", "machine": mach, "iterations": n,
               "seed_render_us": per_op_us(lambda: seed.render_seed(spec, "i-1", mac), n),
               "seed_iso_bytes_us": per_op_us(lambda: seed.iso_bytes(files), n),
               "seed_iso_write_us": per_op_us(lambda: seed.write_seed_iso(iso, files), n),
               "seed_build_us": per_op_us(build, n),
               "seed_iso_size": iso.stat().st_size,
               "argv_build_us": per_op_us(lambda: qargv.build_argv(cfg), n * 10)}
        with running_agent(work) as agent:
            body = {"name": "dry", "image": "test", "ssh_keys": [KEY], "dry_run": True}
            reqs = max(3, n // 10)
            doc["dry_run_request_ms"] = round(per_op_us(
                lambda: agent.ok("POST", "/vms", body), reqs) / 1000, 2)
            doc["dry_run_requests"] = reqs
    emit(doc)


if __name__ == "__main__":
    main()
