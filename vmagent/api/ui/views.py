"""What the web UI shows of a VM, computed from what the operations answer (``list``,
``status``) and what the VM is doing (:mod:`vmagent.api.activity`). Pure functions.

The state a person sees (``shown``) is the agent's state, made precise for a VM whose
qemu runs: "stopping" while a reboot, shutdown or power-off of it runs, "starting"
while a start, reset or create runs and afterwards until the new boot's SSH answers
(at most ``BOOT_GRACE`` seconds: a guest without SSH is "running" after that).
"""

from __future__ import annotations

import time
from typing import Any

STOPPING_OPS = frozenset({"reboot", "shutdown", "poweroff"})
STARTING_OPS = frozenset({"start", "reset", "hard_reset", "create"})
BOOT_OPS = STARTING_OPS | {"reboot"}
BOOT_GRACE = 600.0
# the boot phases after create answers, as vmctl create shows them (vmctl/progress.py;
# a browser cannot try an SSH login, so the last one is not here)
PHASES = (("image", "image ready"), ("disk", "disk created"), ("seed", "seed written"),
          ("qemu", "qemu started"), ("kernel", "kernel started"), ("ssh", "SSH answers"),
          ("cloud_init", "cloud-init finished"))


def shown_state(status: dict, activity: dict, now: float | None = None) -> str:
    state = status.get("state", "unknown")
    busy, last = activity.get("busy"), activity.get("last")
    if busy == "delete":
        return "deleting"
    if state != "running":
        return state
    if busy in STOPPING_OPS:
        return "stopping"
    if busy in STARTING_OPS:
        return "starting"
    now = time.time() if now is None else now
    if (not status.get("ssh_ready") and last and last.get("ok")
            and last.get("op") in BOOT_OPS and now - last.get("ended", 0) < BOOT_GRACE):
        return "starting"
    return "running"


def phases(status: dict) -> dict[str, bool | str]:
    """Which boot phases a status shows as reached (``cloud_init``: True, False or
    "not seen" once SSH answers without any cloud-init on the console)."""
    running = status.get("state") == "running"
    cloud_init = status.get("cloud_init")
    kernel = bool((status.get("boot") or {}).get("kernel") or status.get("ssh_ready")
                  or cloud_init is not None)
    reached: dict[str, bool | str] = {k: running for k in ("image", "disk", "seed", "qemu")}
    reached["kernel"] = running and kernel
    reached["ssh"] = running and bool(status.get("ssh_ready"))
    if cloud_init in ("done", "error"):
        reached["cloud_init"] = True
    elif reached["ssh"] and cloud_init is None:
        reached["cloud_init"] = "not seen"
    else:
        reached["cloud_init"] = False
    return reached


def size(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def resources(spec: dict) -> str:
    cpus = spec.get("cpus")
    return f"{cpus if cpus is not None else '-'} CPU · {size(spec.get('memory'))} RAM · " \
        f"{size(spec.get('disk'))} disk"


def ssh_command(status: dict) -> str:
    return f"vmctl ssh {status.get('name', '')}"


def ssh_on_host(status: dict) -> str | None:
    """The plain ssh command on the agent's host (the port is on its loopback)."""
    port = status.get("ssh_port")
    if not port:
        return None
    return f"ssh -p {port} {status.get('ssh_user') or 'root'}@{status.get('ssh_host')}"


def row(status: dict, activity: dict) -> dict[str, Any]:
    """One VM as the list shows it (and as /ui/api/vms answers)."""
    return {"name": status.get("name"), "state": status.get("state"),
            "shown": shown_state(status, activity), "busy": activity.get("busy"),
            "link_alive": bool(status.get("link_alive")),
            "net_alive": bool(status.get("net_alive")), "owner": status.get("owner"),
            "resources": resources(status.get("spec") or {}),
            "ssh": ssh_command(status), "reason": status.get("reason")}
