"""Parallel creates: 3 VMs created at once versus one alone, each until an SSH login
works. The agent must not serialize boots: the ratio (all three / one) shows what the
machine's cores allow, and the create requests themselves must return at once.

    python3 bench/parallel_create.py [--n 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (AgentProcess, emit, keypair, kill_under, machine,  # noqa: E402
                    wait_ssh_login)


def create(agent: AgentProcess, name: str, key: Path, out: dict) -> None:
    t0 = time.monotonic()
    st = agent.ok("POST", "/vms", {"name": name, "image": "test", "memory": "1G",
                                   "ssh_keys": [key.with_suffix(".pub").read_text()]})
    out[name] = {"request_s": time.monotonic() - t0}
    out[name]["ssh_s"] = wait_ssh_login(st["ssh_port"], key, timeout=1200) - t0


def batch(agent: AgentProcess, names: list[str], key: Path) -> tuple[float, dict]:
    out: dict = {}
    t0 = time.monotonic()
    threads = [threading.Thread(target=create, args=(agent, n, key, out)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.monotonic() - t0
    for n in names:
        agent.ok("DELETE", f"/vms/{n}")
    if len(out) != len(names):
        raise RuntimeError(f"some creates failed: {out}")
    return total, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 VMs")
    args = p.parse_args()
    n = 2 if args.quick else args.n
    with tempfile.TemporaryDirectory(prefix="bench-par-") as tmp:
        agent = AgentProcess(Path(tmp) / "state").start()
        try:
            agent.import_test_image()
            key = keypair(Path(tmp))
            # --quick exercises the parallel path only (no solo baseline)
            one = None if args.quick else batch(agent, ["solo"], key)[0]
            many, detail = batch(agent, [f"par{i}" for i in range(n)], key)
        finally:
            agent.stop()
            kill_under(Path(tmp))
    requests = [d["request_s"] for d in detail.values()]
    emit({"benchmark": "parallel_create", "machine": machine(), "n": n,
          "one_alone_s": round(one, 2) if one else None,
          "all_at_once_s": round(many, 2),
          "ratio": round(many / one, 2) if one else None,
          "create_request_s_max": round(max(requests), 2),
          "per_vm_ssh_s": {k: round(v["ssh_s"], 2) for k, v in detail.items()},
          "note": f"{n} TCG guests share {machine()['cores']} cores"})


if __name__ == "__main__":
    main()
