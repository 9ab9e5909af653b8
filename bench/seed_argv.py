"""Seed ISO build time (render + write with pycdlib) and dry-run argv build time.

    python3 bench/seed_argv.py [--n 200] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

from vmagent import argv as qargv  # noqa: E402
from vmagent import seed  # noqa: E402
from vmagent.spec import Defaults, VMSpec, apply_defaults  # noqa: E402

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdM09Ct5ZbpGEQm6BvLA/Ji8N4McDg7RPn/6+OGhCmD b@x"


def per_op_us(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - t0) / n * 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    n = 5 if args.quick else args.n
    spec = apply_defaults(VMSpec.from_dict({
        "name": "bench", "ssh_keys": [KEY], "user_data": "packages: [git, vim]\n"}),
        Defaults(), 2 << 30)
    with tempfile.TemporaryDirectory() as tmp:
        iso = Path(tmp) / "seed.iso"
        files = seed.render_seed(spec, seed.new_instance_id("bench"), "52:54:00:00:00:01")
        cfg = qargv.MachineConfig(name="bench", run_dir=Path(tmp), cpus=2, memory=2 << 30,
                                  accel="tcg", ssh_port=22022, mac="52:54:00:00:00:01",
                                  vmgenid=str(uuid.uuid4()),
                                  kernel_boot=qargv.KernelBoot("/k", "/i", "root=/dev/vda"))
        emit({"benchmark": "seed_argv", "machine": machine(), "iterations": n,
              "seed_render_us": per_op_us(lambda: seed.render_seed(
                  spec, "i-1", "52:54:00:00:00:01"), n),
              "seed_iso_write_us": per_op_us(lambda: seed.write_seed_iso(iso, files), n),
              "argv_build_us": per_op_us(lambda: qargv.build_argv(cfg), n * 10)})


if __name__ == "__main__":
    main()
