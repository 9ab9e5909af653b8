"""Run directories and VM state on disk.

``STATE_ROOT/vms/<name>/`` holds everything of one VM: ``spec.json``, ``state.json``,
``argv.json``, ``disk.qcow2``, ``seed.iso``, ``qemu.pid``, the sockets and
``console.log``. Every JSON file is written atomically (write, fsync, rename). A VM is
being created in ``vms/.new-<name>-<rand>/`` and appears by one rename; a VM being
deleted is renamed to ``vms/.del-<name>-<rand>/`` first. Leftovers of either (after a
crash) are removed when the store opens, so no half VM is ever listed.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmagent.errors import InternalError
from vmagent.fsutil import atomic_write_json, fsync_dir, read_json
from vmagent.spec import VMSpec

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
STATE_FILE = "state.json"
ARGV_FILE = "argv.json"


class State(str, enum.Enum):
    CREATING = "creating"
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BROKEN = "broken"
    DELETING = "deleting"


@dataclass
class Runtime:
    """What state.json holds: the state and what the next/current qemu run needs."""

    state: State = State.CREATING
    accel: str | None = None
    ssh_port: int | None = None
    mac: str = ""
    vmgenid: str = ""
    instance_id: str = ""
    created: str = ""
    started_at: float | None = None     # epoch seconds of the last qemu start
    boot_offset: int = 0                # console.log size when the current boot began
    reason: str | None = None           # why broken / what last failed
    config_pending: bool = False        # push_config done, not yet booted with it

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Runtime":
        known = {f.name for f in dataclasses.fields(cls)}
        rt = cls(**{k: v for k, v in data.items() if k in known})
        rt.state = State(rt.state)
        return rt


@dataclass
class VMRecord:
    name: str
    run_dir: Path
    spec: VMSpec
    rt: Runtime = field(default_factory=Runtime)


def spec_from_json(data: dict[str, Any]) -> VMSpec:
    known = set(VMSpec.FIELDS)
    return VMSpec(**{k: v for k, v in data.items() if k in known})


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.vms_dir = self.root / "vms"
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o750)
        for leftover in self.vms_dir.glob(".*"):
            log.warning("removing leftover %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    def run_dir(self, name: str) -> Path:
        return self.vms_dir / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.vms_dir.iterdir()
                      if not p.name.startswith(".") and (p / STATE_FILE).exists())

    def load(self, name: str) -> VMRecord:
        run = self.run_dir(name)
        try:
            spec = spec_from_json(read_json(run / SPEC_FILE))
            rt = Runtime.from_json(read_json(run / STATE_FILE))
        except (OSError, ValueError, TypeError) as e:
            raise InternalError(f"VM {name}: unreadable state in {run}: {e}") from e
        return VMRecord(name, run, spec, rt)

    def new_dir(self, name: str) -> Path:
        path = self.vms_dir / f".new-{name}-{os.urandom(4).hex()}"
        path.mkdir(mode=0o750)
        return path

    def commit_new(self, staging: Path, name: str) -> Path:
        """Make a staged VM visible. Fails if the name was taken meanwhile."""
        final = self.run_dir(name)
        if final.exists():
            raise FileExistsError(str(final))
        os.rename(staging, final)
        fsync_dir(self.vms_dir)
        return final

    def save_spec(self, rec: VMRecord) -> None:
        atomic_write_json(rec.run_dir / SPEC_FILE, rec.spec.to_dict())

    def save_state(self, rec: VMRecord) -> None:
        atomic_write_json(rec.run_dir / STATE_FILE, rec.rt.to_json())

    def save_argv(self, rec: VMRecord, argv: list[str]) -> None:
        atomic_write_json(rec.run_dir / ARGV_FILE, argv)

    def remove(self, name: str) -> None:
        run = self.run_dir(name)
        grave = self.vms_dir / f".del-{name}-{os.urandom(4).hex()}"
        os.rename(run, grave)
        fsync_dir(self.vms_dir)
        shutil.rmtree(grave)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
