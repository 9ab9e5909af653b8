"""Shared helpers of the benchmarks: a private agent, the machine description, stats."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from agent_helpers import (IMAGE_DIR, AgentProcess, keypair, process_running,  # noqa: E402
                           ssh)

__all__ = ["ROOT", "IMAGE_DIR", "AgentProcess", "keypair", "process_running", "ssh",
           "machine", "median", "emit", "free_port", "wait_ssh_login", "vmctl",
           "kill_under"]


def machine() -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "qemu": qemu, "accel": "tcg",
            "loadavg_at_start": os.getloadavg()}


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def emit(doc: dict) -> None:
    doc["loadavg_at_end"] = os.getloadavg()
    print(json.dumps(doc, indent=2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ssh_login(port: int, key: Path, timeout: float = 600) -> float:
    """Poll an SSH login running ``true`` until it works; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ssh(port, key, "true", timeout=30).returncode == 0:
            return time.monotonic()
        time.sleep(0.5)
    raise TimeoutError(f"no SSH login on port {port} within {timeout:g}s")


def vmctl(agent: AgentProcess, *args: str, check: bool = True,
          timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "VMCTL_AGENT": f"unix://{agent.socket}"}
    res = subprocess.run([sys.executable, "-m", "vmctl", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"vmctl {' '.join(args)} failed ({res.returncode}): "
                           f"{res.stderr[-2000:]}")
    return res


def kill_under(path: Path) -> None:
    """Kill every qemu whose command line names ``path`` (this benchmark's own)."""
    subprocess.run(["pkill", "-9", "-f", f"qemu-system.*{path}"], check=False)
