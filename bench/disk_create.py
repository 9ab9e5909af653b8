"""Instance disk creation against base size: a qcow2 overlay (what the agent does,
vmagent.qemu.disks.create_overlay) on the test image and on sparse 2 GB and 20 GB qcow2
bases, against a full copy of each base (what Multipass does): a plain file copy
(`cp --sparse=never`) and `qemu-img convert` to a new, independent qcow2. Overlay
creation time must not grow with the base size.

    python3 bench/disk_create.py [--runs 7] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGE_DIR, emit, log, machine, median, workdir  # noqa: E402

from vmagent.qemu import disks  # noqa: E402

GOAL = 1.5     # the overlay on the 20 GB base may take at most this times the smallest


def sparse_base(path: Path, size: int) -> Path:
    """A sparse qcow2 base of virtual ``size`` with 4 MiB of data at each end."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                   check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 4M", "-c",
                    f"write -P 0xa5 {size - (4 << 20)} 4M", str(path)],
                   check=True, capture_output=True)
    return path


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="one run, bases up to 2 GB")
    args = p.parse_args()
    runs = 1 if args.quick else max(1, args.runs)
    mach = machine()
    out = {}
    # $TMPDIR, else /var/tmp: on disk, like a state dir (/tmp may be a tmpfs)
    with workdir("bench-disk-", base=os.environ.get("TMPDIR") or "/var/tmp") as work:
        bases = {"test-image": IMAGE_DIR / "debian-12-test.qcow2",
                 "sparse-2G": sparse_base(work / "b2.qcow2", 2 << 30)}
        if not args.quick:
            bases["sparse-20G"] = sparse_base(work / "b20.qcow2", 20 << 30)
        copies = {
            "cp_sparse_never": lambda base, dest: ["cp", "--sparse=never", str(base),
                                                   str(dest)],
            "qemu_img_convert": lambda base, dest: ["qemu-img", "convert", "-U", "-O",
                                                    "qcow2", str(base), str(dest)],
            # the floor under the agent's overlay: one bare qemu-img create
            "bare_qemu_img_create": lambda base, dest: [
                "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                str(dest), str(size)],
        }
        for label, base in bases.items():
            log(f"base {label}")
            info = asyncio.run(disks.qemu_img_info(base, "qcow2", force_share=True))
            size = max(info["virtual-size"], 4 << 30)
            times: dict[str, list[float]] = {"overlay": [], **{k: [] for k in copies}}
            # one warm-up round (page cache), then the counted rounds, interleaved
            for i in range(runs + 1):
                dest = work / f"ov-{label}-{i}.qcow2"
                t = timed(lambda: asyncio.run(disks.create_overlay(base, "qcow2", dest,
                                                                   size)))
                dest.unlink()
                if i:
                    times["overlay"].append(t)
                for kind, argv in copies.items():
                    dest = work / f"{kind}-{label}-{i}"
                    t = timed(lambda: subprocess.run(argv(base, dest), check=True))
                    dest.unlink()
                    if i:
                        times[kind].append(t)
            ov = median(times["overlay"])
            out[label] = {
                "virtual_size": info["virtual-size"],
                "file_size": base.stat().st_size,
                "allocated": info["actual-size"],
                "overlay_ms_median": round(ov * 1000, 2),
                "overlay_ms_min": round(min(times["overlay"]) * 1000, 2),
                **{f"{k}_ms_median": round(median(times[k]) * 1000, 2) for k in copies},
                **{f"{k}_over_overlay": round(median(times[k]) / ov, 1) for k in copies},
            }
    ovs = {k: v["overlay_ms_median"] for k, v in out.items()}
    largest = list(ovs)[-1]            # the 20 GB base (2 GB with --quick)
    spread = round(max(ovs.values()) / min(ovs.values()), 2)
    emit({"benchmark": "disk_create", "machine": mach, "runs": runs, "bases": out,
          "overlay_max_over_min": spread,
          "overlay_largest_base": largest,
          "overlay_largest_over_test_image": round(ovs[largest] / ovs["test-image"], 2),
          "goal_overlay_max_over_min": GOAL, "goal_met": spread <= GOAL})


if __name__ == "__main__":
    main()
