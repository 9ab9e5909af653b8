"""VM records on disk: ``STATE_DIR/vms/NAME/`` (file names in :mod:`vmagent.rundir`).

``spec.json`` (what the VM is) and ``state.json`` (its runtime state) are versioned
records written atomically (write, fsync, rename). A VM is staged in a hidden directory
and appears by one rename; a deleted VM disappears by one rename first. Leftovers of
either (after a crash) are removed when the store opens, so no half VM is ever listed.
Keys a newer agent wrote and this one does not know are kept and written back, with a
warning, rather than dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmagent import rundir
from vmagent.errors import InternalError
from vmagent.fsutil import (FormatError, StagedDir, atomic_write_json, read_record,
                            remove_dir, sweep, write_record)
from vmagent.spec import VMSpec
from vmagent.vms.state import State

log = logging.getLogger(__name__)

SPEC_FORMAT = 1          # 0: the unversioned files of vmagent 0.1 (same keys)
STATE_FORMAT = 1


@dataclass
class Runtime:
    """What state.json holds: the state and what the next/current qemu run needs."""

    state: State = State.STOPPED
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
    creating: bool = False              # the create has not answered yet (rolled back
                                        # after a restart)
    changed_at: float | None = None     # epoch seconds of the last state change
    owner: str | None = None            # who created it (None: before ownership existed;
                                        # the operators')
    accounts: list[dict] | None = None  # its guest accounts (identity/accounts.py);
                                        # None: the spec's admins, as before people
    gpus: list[str] | None = None       # the PCI GPUs it last ran with (alloc/gpu.py)
    restarts: int = 0                   # restarts by its restart policy, ever
    restart_times: list[float] = field(default_factory=list)   # the recent ones (epoch
                                        # seconds; the crash-loop window); an operator's
                                        # start clears them (vmagent/monitor/healing.py)
    launched_in: str | None = None      # the run dir its running qemu started in, when
                                        # the VM was renamed since (registry.rename)
    device_model: int = 1               # its CPU model and devices (qemu/argv.py's
                                        # DEVICE_MODEL); 1: records made before models
    extra: dict[str, Any] = field(default_factory=dict)   # keys of a newer agent

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out["state"] = self.state.value
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Runtime":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rt = cls(**{k: v for k, v in data.items() if k in known})
        rt.state = State(rt.state)
        rt.extra = {k: v for k, v in data.items() if k not in known}
        return rt


@dataclass
class VMRecord:
    name: str
    run_dir: Path
    spec: VMSpec
    rt: Runtime = field(default_factory=Runtime)
    spec_extra: dict[str, Any] = field(default_factory=dict)   # keys of a newer agent


def _unknown(name: str, what: str, keys: list[str]) -> None:
    if keys:
        log.warning("VM %s: %s has keys this agent does not know (kept): %s", name, what,
                    ", ".join(sorted(keys)))


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.vms_dir = self.root / "vms"
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        for leftover in sweep(self.vms_dir):
            log.warning("removed leftover %s", leftover)

    def run_dir(self, name: str) -> Path:
        return self.vms_dir / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.vms_dir.iterdir()
                      if not p.name.startswith(".") and (p / rundir.STATE).exists())

    def load(self, name: str) -> VMRecord:
        run = self.run_dir(name)
        try:
            spec_doc = read_record(run / rundir.SPEC, SPEC_FORMAT)
            state_doc = read_record(run / rundir.STATE, STATE_FORMAT)
            known = set(VMSpec.FIELDS)
            spec = VMSpec(**{k: v for k, v in spec_doc.items() if k in known})
            rt = Runtime.from_json(state_doc)
        except (OSError, ValueError, TypeError, FormatError) as e:
            raise InternalError(f"VM {name}: unreadable state in {run}: {e}") from e
        spec_extra = {k: v for k, v in spec_doc.items() if k not in known}
        _unknown(name, rundir.SPEC, list(spec_extra))
        _unknown(name, rundir.STATE, list(rt.extra))
        return VMRecord(name, run, spec, rt, spec_extra)

    def staged(self, name: str) -> StagedDir:
        """A hidden directory to build a new VM in; :meth:`commit` makes it the VM's."""
        return StagedDir(self.vms_dir, name)

    def commit(self, staged: StagedDir, rec: VMRecord) -> None:
        """Make a staged VM visible (FileExistsError if the name was taken meanwhile)."""
        rec.run_dir = staged.commit(self.run_dir(rec.name))

    def save_spec(self, rec: VMRecord) -> None:
        write_record(rec.run_dir / rundir.SPEC, {**rec.spec_extra, **rec.spec.to_dict()},
                     SPEC_FORMAT)

    def save_state(self, rec: VMRecord) -> None:
        write_record(rec.run_dir / rundir.STATE, rec.rt.to_json(), STATE_FORMAT)

    def save(self, rec: VMRecord) -> None:
        self.save_spec(rec)
        self.save_state(rec)

    def save_argv(self, rec: VMRecord, argv: list[str]) -> None:
        atomic_write_json(rec.run_dir / rundir.ARGV, argv)   # a plain list: for people

    def rename(self, rec: VMRecord, new: str) -> None:
        """Move a VM's run dir to the name ``new`` (one rename; FileExistsError if the
        name is taken)."""
        target = self.run_dir(new)
        if target.exists():
            raise FileExistsError(str(target))
        rec.run_dir.rename(target)
        rec.run_dir, rec.name = target, new

    def remove(self, name: str) -> None:
        remove_dir(self.run_dir(name))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
