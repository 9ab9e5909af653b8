"""The cgroup file trees behind :class:`vmagent.alloc.cgroup.Cgroups`: v1 (one hierarchy
per controller) and v2 (one unified hierarchy), and the choice between them.

Layout: v1 ``ROOT/CONTROLLER/PARENT/NAME`` for the ``cpu``, ``cpuacct`` and ``memory``
hierarchies; v2 ``ROOT/PARENT/NAME``, with ``+cpu +memory`` enabled in the
``cgroup.subtree_control`` of ``PARENT`` and its ancestors. ``ROOT`` may be a plain
directory (the tests' trees): then files are written as they are and removing a
cgroup removes its files.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from vmagent.alloc.cgroup import ENTER_SCRIPT, Cgroups, Limits, NoCgroups
from vmagent.errors import Conflict, InternalError
from vmagent.spec import format_size

log = logging.getLogger(__name__)


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        if e.errno == errno.EBUSY and path.name in ("memory.limit_in_bytes", "memory.max"):
            raise Conflict(f"{path.name} {format_size(int(value))}: qemu uses more than "
                           "that now; give a larger ram_limit, or shut the VM down first",
                           file=str(path)) from None
        raise InternalError(f"cgroup: cannot write {value!r} to {path}: "
                            f"{e.strerror or e}") from None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _pids(path: Path) -> set[int]:
    text = _read(path) or ""
    return {int(p) for p in text.split() if p.isdigit()}


def _alive(pid: int) -> bool:
    """(A test's tree keeps the pids written into it: those that exited count as gone.)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _is_cgroupfs(path: Path) -> bool:
    """Whether ``path`` is on a mounted cgroup file system (not a test's directory)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    real = os.path.realpath(path)
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and parts[2] in ("cgroup", "cgroup2") and (
                real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
            return True
    return False


def _rmdir(path: Path, real: bool) -> bool:
    """Remove a cgroup directory (True: gone). A live cgroup holding processes is busy."""
    if not path.exists():
        return True
    try:
        os.rmdir(path)
        return True
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        if e.errno == errno.ENOTEMPTY and not real:
            if any(_alive(p) for p in _pids(path / "cgroup.procs")):
                return False
            shutil.rmtree(path)
            return True
        raise InternalError(f"cgroup: cannot remove {path}: {e.strerror or e}") from None


class _Tree:
    """What both versions share: directories of one name under the parent."""

    kind = "?"

    def __init__(self, root: Path, parent: str) -> None:
        self.root = Path(root)
        self.parent = parent.strip("/")
        # the parent's own CPU weight: the host's allocatable cores (weights are
        # relative to siblings, so the VMs together weigh what they were promised
        # against the host's other processes); None: left as it is
        self.parent_cores: float | None = None

    def dirs(self, name: str) -> list[Path]:
        raise NotImplementedError

    def parents(self) -> list[Path]:
        raise NotImplementedError

    def path(self, name: str) -> str | None:
        """The cgroup's path as ``/proc/PID/cgroup`` shows it."""
        return f"/{self.parent}/{name}"

    def exists(self, name: str) -> bool:
        return all(d.is_dir() for d in self.dirs(name))

    def wrap(self, name: str) -> list[str]:
        return ["/bin/sh", "-c", ENTER_SCRIPT, "vmagent-cgroup",
                *(str(d / "cgroup.procs") for d in self.dirs(name)), "--"]

    def attach(self, name: str, pid: int) -> None:
        for d in self.dirs(name):
            if self.kind == "v1" and (d / "memory.move_charge_at_immigrate").exists():
                try:                           # the charges come along (where they can)
                    (d / "memory.move_charge_at_immigrate").write_text("3")
                except OSError:
                    pass
            _write(d / "cgroup.procs", str(pid))

    def contains(self, name: str, pid: int) -> bool:
        return all(pid in _pids(d / "cgroup.procs") for d in self.dirs(name))

    def remove(self, name: str) -> bool:
        gone = all([_rmdir(d, self.real) for d in self.dirs(name)])
        if gone:                    # the agent's parent goes with its last VM
            for p in self.parents():
                if p.is_dir() and not any(c.is_dir() for c in p.iterdir()):
                    _rmdir(p, self.real)
        return gone

    def names(self) -> list[str]:
        found: set[str] = set()
        for p in self.parents():
            if p.is_dir():
                found |= {c.name for c in p.iterdir() if c.is_dir()}
        return sorted(found)

    def describe(self) -> dict[str, Any]:
        return {"version": self.kind, "parent": f"/{self.parent}",
                "dirs": [str(p) for p in self.parents()]}


class V1(_Tree):
    kind = "v1"
    CONTROLLERS = ("cpu", "cpuacct", "memory")

    def __init__(self, root: Path, parent: str) -> None:
        super().__init__(root, parent)
        # co-mounted hierarchies (cpu,cpuacct) are one directory
        self.mounts = list(dict.fromkeys(
            Path(os.path.realpath(self.root / c)) for c in self.CONTROLLERS
            if (self.root / c).is_dir()))
        self.real = _is_cgroupfs(self.root / "cpu")

    @staticmethod
    def usable(root: Path) -> str | None:
        """None if v1 cpu and memory are mounted and writable at ``root``, else why not."""
        for ctrl, probe in (("cpu", "cpu.shares"), ("memory", "memory.limit_in_bytes")):
            if not (root / ctrl / probe).exists():
                return f"no cgroup v1 {ctrl} controller at {root / ctrl}"
            if not os.access(root / ctrl, os.W_OK):
                return f"{root / ctrl} is not writable (run the agent as root)"
        return None

    def parents(self) -> list[Path]:
        return [m / self.parent for m in self.mounts]

    def dirs(self, name: str) -> list[Path]:
        return [p / name for p in self.parents()]

    def _dir(self, ctrl: str, name: str) -> Path:
        return Path(os.path.realpath(self.root / ctrl)) / self.parent / name

    def create(self, name: str, limits: Limits) -> None:
        for d in self.dirs(name):
            d.mkdir(parents=True, exist_ok=True)
        if self.parent_cores is not None:
            parent = Limits(self.parent_cores, None, 0, 0).v1()["cpu"]["cpu.shares"]
            _write(self._dir("cpu", name).parent / "cpu.shares", parent)
        self.apply(name, limits)

    def apply(self, name: str, limits: Limits) -> None:
        for ctrl, files in limits.v1().items():
            for fname, value in files.items():
                _write(self._dir(ctrl, name) / fname, value)

    def values(self, name: str) -> dict[str, str]:
        out = {}
        for ctrl, files in Limits(None, None, 0, 0).v1().items():
            for fname in files:
                value = _read(self._dir(ctrl, name) / fname)
                if value is not None:
                    out[fname] = value
        return out

    def usage(self, name: str) -> dict[str, Any]:
        acct = self._dir("cpuacct", name) / "cpuacct.usage"
        mem = self._dir("memory", name)
        out: dict[str, Any] = {}
        if (ns := _read(acct)) and ns.isdigit():
            out["cpu_seconds"] = int(ns) / 1e9
        for key, fname in (("memory", "memory.usage_in_bytes"),
                           ("memory_peak", "memory.max_usage_in_bytes"),
                           ("memory_limit", "memory.limit_in_bytes"),
                           ("memory_limit_hits", "memory.failcnt")):
            if (v := _read(mem / fname)) and v.isdigit():
                out[key] = int(v)
        stat = _read(mem / "memory.stat") or ""
        for line in stat.splitlines():
            k, _, v = line.partition(" ")
            if k in ("rss", "cache") and v.isdigit():
                out[f"memory_{k}"] = int(v)
        oom = _read(mem / "memory.oom_control") or ""
        for line in oom.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill" and v.isdigit():
                out["oom_kills"] = int(v)
        return out


class V2(_Tree):
    kind = "v2"

    def __init__(self, root: Path, parent: str) -> None:
        super().__init__(root, parent)
        self.real = _is_cgroupfs(self.root)

    @staticmethod
    def usable(root: Path) -> str | None:
        have = (_read(root / "cgroup.controllers") or "").split()
        if not (root / "cgroup.controllers").exists():
            return f"no cgroup v2 hierarchy at {root}"
        missing = [c for c in ("cpu", "memory") if c not in have]
        if missing:
            return f"the cgroup v2 hierarchy at {root} has no {' and '.join(missing)} " \
                   "controller"
        if not os.access(root, os.W_OK):
            return f"{root} is not writable (run the agent as root)"
        return None

    def parents(self) -> list[Path]:
        return [self.root / self.parent]

    def dirs(self, name: str) -> list[Path]:
        return [self.root / self.parent / name]

    def _delegate(self) -> None:
        """``+cpu +memory`` in the subtree_control of the root down to the parent."""
        node = self.root
        for part in [""] + self.parent.split("/"):
            node = node / part if part else node
            node.mkdir(exist_ok=True)
            control = node / "cgroup.subtree_control"
            enabled = (_read(control) or "").split()
            missing = [c for c in ("cpu", "memory") if c not in enabled]
            if missing:
                if self.real:
                    _write(control, " ".join(f"+{c}" for c in missing))
                else:
                    control.write_text(" ".join(enabled + missing) + "\n")

    def create(self, name: str, limits: Limits) -> None:
        self._delegate()
        self.dirs(name)[0].mkdir(exist_ok=True)
        if self.parent_cores is not None:
            weight = Limits(self.parent_cores, None, 0, 0).v2()["cpu.weight"]
            _write(self.parents()[0] / "cpu.weight", weight)
        self.apply(name, limits)

    def apply(self, name: str, limits: Limits) -> None:
        d = self.dirs(name)[0]
        for fname, value in limits.v2().items():
            _write(d / fname, value)

    def values(self, name: str) -> dict[str, str]:
        d = self.dirs(name)[0]
        return {f: v for f in Limits(None, None, 0, 0).v2()
                if (v := _read(d / f)) is not None}

    def usage(self, name: str) -> dict[str, Any]:
        d = self.dirs(name)[0]
        out: dict[str, Any] = {}
        for line in (_read(d / "cpu.stat") or "").splitlines():
            k, _, v = line.partition(" ")
            if k == "usage_usec" and v.isdigit():
                out["cpu_seconds"] = int(v) / 1e6
        for key, fname in (("memory", "memory.current"), ("memory_peak", "memory.peak"),
                           ("memory_limit", "memory.max")):
            if (v := _read(d / fname)) and v.isdigit():
                out[key] = int(v)
        for line in (_read(d / "memory.events") or "").splitlines():
            k, _, v = line.partition(" ")
            if k in ("max", "oom_kill") and v.isdigit():
                out["memory_limit_hits" if k == "max" else "oom_kills"] = int(v)
        return out


def open_cgroups(mode: str, root: Path, parent: str) -> Cgroups:
    """The backend for ``mode`` (auto: v2 where the root has its cpu and memory
    controllers, else v1, else none with the reason). An explicit v1/v2 that is not
    usable is an error."""
    root = Path(root)
    if mode == "none":
        return NoCgroups("disabled in the agent's config (cgroup.mode = none)")
    why2, why1 = V2.usable(root), V1.usable(root)
    if mode == "v2" or (mode == "auto" and why2 is None):
        if why2 is not None:
            raise InternalError(f"cgroup.mode v2: {why2}")
        return V2(root, parent)
    if mode == "v1" or (mode == "auto" and why1 is None):
        if why1 is not None:
            raise InternalError(f"cgroup.mode v1: {why1}")
        return V1(root, parent)
    reason = f"no usable cgroup hierarchy ({why2}; {why1})"
    log.warning("guarantees and limits are not enforced: %s", reason)
    return NoCgroups(reason, parent)
