"""Instance disk creation against base size: a qcow2 overlay (what the agent does) on the
test image and on sparse 2 GB and 20 GB bases, against a full copy of each base (what
Multipass does). Overlay time must not grow with the base size.

    python3 bench/disk_create.py [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGE_DIR, emit, machine, median  # noqa: E402

from vmagent import disks  # noqa: E402


def sparse_base(path: Path, size: int) -> Path:
    """A qcow2 base of ``size`` with some data written at both ends."""
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
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-disk-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        bases = {"test-image": IMAGE_DIR / "debian-12-test.qcow2",
                 "sparse-2G": sparse_base(work / "b2.qcow2", 2 << 30)}
        if not args.quick:
            bases["sparse-20G"] = sparse_base(work / "b20.qcow2", 20 << 30)
        for label, base in bases.items():
            info = asyncio.run(disks.qemu_img_info(base, "qcow2", force_share=True))
            size = max(info["virtual-size"], 4 << 30)
            ov, full = [], []
            for i in range(runs):
                dest = work / f"ov-{label}-{i}.qcow2"
                ov.append(timed(lambda: asyncio.run(
                    disks.create_overlay(base, "qcow2", dest, size))))
                dest.unlink()
                copy = work / f"full-{label}-{i}.qcow2"
                # a full, independent copy of the base (every allocated block read and
                # written), as tools that copy the cloud image per instance do
                full.append(timed(lambda: subprocess.run(
                    ["qemu-img", "convert", "-O", "qcow2", "-U", str(base), str(copy)],
                    check=True)))
                copy.unlink()
            out[label] = {"virtual_size": info["virtual-size"],
                          "allocated": info["actual-size"],
                          "overlay_ms_median": round(median(ov) * 1000, 2),
                          "full_copy_ms_median": round(median(full) * 1000, 2)}
    ovs = [v["overlay_ms_median"] for v in out.values()]
    emit({"benchmark": "disk_create", "machine": machine(), "runs": runs, "bases": out,
          "overlay_max_over_min": round(max(ovs) / min(ovs), 2)})


if __name__ == "__main__":
    main()
