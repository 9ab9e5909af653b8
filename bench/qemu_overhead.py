"""qemu's own memory beyond the guest's RAM: what ``ram_limit`` must hold besides
``memory`` (vmagent/alloc/sizing.py: QEMU_OVERHEAD).

A VM is booted cold by a private agent (its cgroup enforced, its ram_limit generous so
that the limit does not shape what is measured) and its qemu's memory is read from
``/proc/PID/smaps`` by mapping: the guest's RAM (the one anonymous read-write mapping
of the guest's size), TCG's translated-code buffer (the read-write-execute mapping),
and everything else (qemu's heap, thread stacks, device state, VGA RAM, libraries).
The overhead is everything but the guest's RAM. It is read after boot (SSH answers),
after a workload that runs a lot of different code in the guest (translated code
grows with it), and after the guest filled its RAM; the cgroup's peak is read too.

    python3 bench/qemu_overhead.py [--memory 1G] [--cpus 2] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BOOT_TIMEOUT, emit, keypair, log, machine, running_agent,  # noqa: E402
                    ssh, workdir)

MiB = 1 << 20
WORKLOAD = ("find /usr -type f -size -200k 2>/dev/null | head -3000 | xargs cat "
            "> /dev/null 2>&1; for p in /usr/bin/*; do timeout 1 \"$p\" --version "
            "> /dev/null 2>&1 < /dev/null; done; true")


def parse_size(text: str) -> int:
    units = {"M": MiB, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()])


def smaps(pid: int, guest_ram: int) -> dict:
    """RSS by kind of mapping, in MiB."""
    out = {"guest_ram": 0, "tcg_code": 0, "other": 0, "total": 0}
    kind, size = "other", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            size, perms = end - start, parts[1]
            anon = len(parts) == 5
            if anon and perms.startswith("rw-") and size >= guest_ram:
                kind = "guest_ram"
            elif anon and "x" in perms:      # TCG's code buffer, in per-vCPU regions
                kind = "tcg_code"
            else:
                kind = "other"
        elif parts[0] == "Rss:":
            kib = int(parts[1])
            out[kind] += kib
            out["total"] += kib
    return {k: round(v / 1024, 1) for k, v in out.items()}


def cgroup(status: dict) -> dict:
    use = (status.get("allocation") or {}).get("usage") or {}
    return {k: round(v / MiB, 1) for k, v in use.items()
            if k.startswith("memory") and isinstance(v, int) and "hits" not in k}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a 512M guest, a short workload")
    args = ap.parse_args()
    if args.quick:
        args.memory = "512M"
    guest = parse_size(args.memory)
    with workdir("vmctl-overhead-") as work, running_agent(work) as agent:
        key = keypair(work)
        agent.ok("POST", "/keys", {"keys": key.with_suffix(".pub").read_text()})
        try:
            emit(measure(agent, key, args, guest))
        finally:            # the VM goes with its cgroup (the agent stops next)
            agent.call("DELETE", "/vms/ovh", timeout=120)


def measure(agent, key: Path, args: argparse.Namespace, guest: int) -> dict:
    t0 = time.monotonic()
    st = agent.ok("POST", "/vms", {"name": "ovh", "image": "test", "cpus": args.cpus,
                                   "memory": args.memory, "segment": "default",
                                   "ram_limit": "4G"}, timeout=600)
    pid, port, user = st["pid"], st["ssh_port"], st["ssh_user"]
    st = agent.wait_ready("ovh", timeout=BOOT_TIMEOUT, cloud_init=True)
    log(f"booted in {time.monotonic() - t0:.1f}s")
    points = {"booted": {"smaps": smaps(pid, guest),
                         "cgroup": cgroup(agent.ok("GET", "/vms/ovh"))}}
    res = ssh(port, key, WORKLOAD.replace("head -3000", "head -100") if args.quick
              else WORKLOAD, user=user, timeout=1800)
    log(f"workload exit {res.returncode}")
    points["after_workload"] = {"smaps": smaps(pid, guest),
                                "cgroup": cgroup(agent.ok("GET", "/vms/ovh"))}
    fill = max(64, guest // MiB - 200)
    res = ssh(port, key, f"head -c {fill}M /dev/zero | tail > /dev/null; "
              "cat /proc/meminfo | head -3", user=user, timeout=600)
    log(f"fill {fill}M: exit {res.returncode} {res.stdout.strip()[:200]}")
    points["after_filling_ram"] = {"smaps": smaps(pid, guest),
                                   "cgroup": cgroup(agent.ok("GET", "/vms/ovh"))}
    over = {k: round(p["smaps"]["total"] - p["smaps"]["guest_ram"], 1)
            for k, p in points.items()}
    final = agent.ok("GET", "/vms/ovh")
    return {"benchmark": "qemu_overhead", "machine": machine(),
            "guest": {"memory_mib": guest // MiB, "cpus": args.cpus},
            "points_mib": points, "overhead_mib": over,
            "overhead_max_mib": max(over.values()),
            "oom_kills": ((final.get("allocation") or {}).get("usage") or {})
            .get("oom_kills"),
            "state": final["state"]}


if __name__ == "__main__":
    main()
