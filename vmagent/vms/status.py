"""What the agent reports about a VM (``status``, ``list``) and about its host."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vmagent.identity import hostkeys
from vmagent.identity.accounts import account_of
from vmagent.vms.ephemeral import expires_at
from vmagent.vms.state import State
from vmagent.vms.vm import VM


def ssh_user(vm: VM, caller: str | None) -> str:
    """The guest account a caller logs in as: their own, else the owner's."""
    accounts = vm.accounts
    for person in (caller, vm.rec.rt.owner):
        if person and (acc := account_of(accounts, person)) is not None:
            return acc.name
    return accounts[0].name if accounts else "root"


def vm_status(vm: VM, caller: str | None = None) -> dict:
    """What ``status`` reports; ``caller``: the person asking (their SSH user)."""
    rec, rt = vm.rec, vm.rec.rt
    running = rt.state == State.RUNNING
    progress = vm.boot_progress() if running else {"kernel": False, "cloud_init": None,
                                                    "console_bytes": vm.console.size()}
    return {
        "name": rec.name,
        "state": rt.state.value,
        "spec": rec.spec.to_dict(),
        "pid": vm.machine.pid() if running or rt.state == State.STOPPING else None,
        "accel": rt.accel,
        "ssh_host": "127.0.0.1",
        "ssh_port": rt.ssh_port,
        "ssh_user": ssh_user(vm, caller),
        "owner": rt.owner,
        "accounts": [a.name for a in vm.accounts],
        "ssh_ready": running and vm.ssh_ready,
        # public halves of the host keys the agent gave the VM (null: learn them from the
        # console); vmctl pins them
        "ssh_host_keys": hostkeys.public(vm.host_keys) if vm.host_keys else None,
        # what the 1 Hz monitor saw (vmagent/monitor/): the guest agent answered a ping
        # (link) and the guest's sshd greeted (net); a warning (the link down too long)
        "link_alive": running and vm.link_alive,
        "net_alive": running and vm.net_alive,
        "warning": vm.warning if running else None,
        "restart": rec.spec.restart_policy,
        "restarts": rt.restarts,
        "cloud_init": progress["cloud_init"] if running else None,
        "boot": {"started_at": rt.started_at if running else None,
                 "console_bytes": progress["console_bytes"],
                 "kernel": progress["kernel"]},
        "config_pending": rt.config_pending,
        "reason": rt.reason,
        "created": rt.created,
        "ephemeral": rec.spec.ephemeral,
        "expires_at": expires_at(vm),       # epoch seconds its TTL ends (null: no TTL)
        "instance_id": rt.instance_id,
        # new for each boot (start, reboot, reset): what an SSH master is bound to
        "boot_id": vm.boot_id if running else None,
        "run_dir": str(rec.run_dir),
    }


def host_capacity(state_dir: Path) -> dict:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpus": os.cpu_count() or 1, "memory": mem,
            "disk_free": shutil.disk_usage(state_dir).free}
