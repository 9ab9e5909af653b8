"""Templates: a booted guest's saved RAM and device state, and warm starts from it.

A template ``T`` lives in ``STATE/templates/T/``:

* ``disk.qcow2``: the template VM's disk (an overlay on its image), frozen read-only
  (mode 0444) after the save; every clone's disk is a new qcow2 overlay on it;
* ``vmstate.bin``: the migration stream written by QMP ``migrate`` to ``exec:cat > FILE``
  while the guest was stopped (RAM and device state); its size and sha256 are recorded;
* ``template.json``: the record (image, cpus, memory, disk, MAC, the argv it ran with,
  the state file's size and sha256, who the guest was);
* ``console.log`` and ``argv.json`` of the template VM, for diagnosis.

**Create** boots a private VM (not in the VM list) from the image, waits until SSH
answers and cloud-init has finished, syncs the guest's disks through the guest agent,
stops the CPUs, saves the state, quits qemu and freezes the files.

**Warm create** (``create`` with ``template``): a new overlay on the template's disk, a
seed with the clone's identity, qemu started with the template's device model (the same
argv but for name, paths, SSH port forward and vmgenid; the MAC is the template's, since
the restored guest has it in its device state) and ``-incoming defer``; then
``migrate-incoming`` from the state file, ``cont``, and re-identification through the
guest agent (:mod:`vmagent.reidentify`) before the VM is reported running. The new
vmgenid on the command line is written into the guest by qemu when the state is loaded
(vmgenid's post-load notifies the guest); a kernel with a vmgenid driver reseeds its RNG
then. Debian's cloud kernel has none, so the script also mixes in host entropy and
forces a reseed (``RNDRESEEDCRNG``) before anything else runs.

This module is the template store; the operations are in :mod:`vmagent.warm` (a mixin
of :class:`~vmagent.manager.Manager`), the clone's new identity in
:mod:`vmagent.reidentify`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import field
from pathlib import Path
from typing import Any

from vmagent.qemu import argv as qargv
from vmagent.errors import Conflict, ImageError, NotFound, VMAgentError
from vmagent.fsutil import atomic_write_json, fsync_dir, read_json, sha256_file
from vmagent.spec import check_name

log = logging.getLogger(__name__)

TEMPLATE_FILE = "template.json"
STATE_FILE = "vmstate.bin"
CLONE_MARKER = "template"            # in a clone's run dir: the template's name


@dataclasses.dataclass
class Template:
    name: str
    image: str
    cpus: int
    memory: int
    disk: int
    mac: str
    vmgenid: str                      # the template VM's; every clone gets a new one
    hostname: str                     # who the saved guest is
    admins: list[str] = field(default_factory=list)   # the template's users (creator)
    state_size: int = 0
    state_sha256: str = ""
    created: str = ""
    build_seconds: float = 0.0
    save_seconds: float = 0.0
    argv: list[str] = field(default_factory=list)
    accel: str = "tcg"
    qemu_version: str | None = None
    path: Path | None = None          # the template's directory (not stored)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("path")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> "Template":
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        return cls(**{k: v for k, v in data.items() if k in known}, path=path)

    @property
    def disk_path(self) -> Path:
        assert self.path is not None
        return self.path / qargv.DISK

    @property
    def state_path(self) -> Path:
        assert self.path is not None
        return self.path / STATE_FILE


class TemplateStore:
    """``STATE/templates``: one directory per template, staged as ``.new-T-x``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".new-*"):
            log.warning("removing leftover template build %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        self._verified: dict[str, tuple] = {}   # name -> stat key of the verified file

    def dir(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and (p / TEMPLATE_FILE).is_file())

    def exists(self, name: str) -> bool:
        return (self.dir(name) / TEMPLATE_FILE).is_file()

    def get(self, name: str) -> Template:
        check_name(name)
        path = self.dir(name)
        try:
            data = read_json(path / TEMPLATE_FILE)
        except FileNotFoundError:
            raise NotFound(f"no template named {name!r} (see 'vmctl template list')",
                           template=name) from None
        except (OSError, ValueError) as e:
            raise ImageError(f"template {name!r}: unreadable {TEMPLATE_FILE}: {e}") from e
        return Template.from_json(data, path)

    def list(self) -> list[Template]:
        out = []
        for n in self.names():
            with contextlib.suppress(VMAgentError):
                out.append(self.get(n))
        return out

    def save(self, tpl: Template, directory: Path) -> None:
        atomic_write_json(directory / TEMPLATE_FILE, tpl.to_json(), mode=0o444)

    def new_dir(self, name: str) -> Path:
        path = self.root / f".new-{name}-{os.urandom(4).hex()}"
        path.mkdir(mode=0o750)
        return path

    def commit(self, staging: Path, name: str) -> Path:
        final = self.dir(name)
        if final.exists():
            raise Conflict(f"template {name!r} already exists")
        os.rename(staging, final)
        fsync_dir(self.root)
        return final

    async def verify(self, tpl: Template) -> None:
        """The state file is the one saved: its size, then its sha256 (hashed once per
        version of the file: the result is kept for its inode, size, mtime and ctime)."""
        path = tpl.state_path
        what = f"template {tpl.name!r}: state file {path}"
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ImageError(f"{what} is missing; the template cannot be used (remove it "
                             "and create it again)", template=tpl.name) from None
        if st.st_size != tpl.state_size:
            raise ImageError(f"{what} is corrupt: {st.st_size} bytes, {tpl.state_size} "
                             "were saved; the template cannot be used (remove it and "
                             "create it again)", template=tpl.name, size=st.st_size,
                             expected_size=tpl.state_size)
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, tpl.state_sha256)
        if self._verified.get(tpl.name) == key:
            return
        digest = await asyncio.to_thread(sha256_file, path)
        if digest != tpl.state_sha256:
            self._verified.pop(tpl.name, None)
            raise ImageError(f"{what} is corrupt: sha256 {digest[:16]}... differs from the "
                             f"recorded {tpl.state_sha256[:16]}...; the template cannot be "
                             "used (remove it and create it again)", template=tpl.name,
                             sha256=digest, expected_sha256=tpl.state_sha256)
        self._verified[tpl.name] = key

    def mark_verified(self, tpl: Template) -> None:
        """The state file was just hashed while saving it."""
        st = tpl.state_path.stat()
        self._verified[tpl.name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                    tpl.state_sha256)

    def remove(self, name: str, keep_disk: bool) -> None:
        """Delete a template. ``keep_disk``: VMs still use its disk as their base, so the
        directory stays with only the disk (no longer listed; collected once unused)."""
        path = self.dir(name)
        self._verified.pop(name, None)
        if keep_disk:
            for p in path.iterdir():
                if p.name != qargv.DISK:
                    p.unlink()
            fsync_dir(path)
            return
        grave = self.root / f".new-del-{name}-{os.urandom(4).hex()}"
        os.rename(path, grave)
        fsync_dir(self.root)
        rmtree_readonly(grave)

    def orphans(self) -> list[str]:
        """Directories of removed templates kept for their disk."""
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and p.is_dir()
                      and not (p / TEMPLATE_FILE).exists())


BUILD_STEPS = ("image", "disk", "boot", "quiesce", "save", "freeze")


class BuildSteps:
    """The steps of a template being built, for ``template_show`` while it runs (the same
    shape as an image build's status: vmctl shows both with one display)."""

    def __init__(self, name: str, console_log: Path) -> None:
        self.name, self.console_log = name, console_log
        self.t0 = time.monotonic()
        self.steps: list[dict[str, Any]] = []
        self.error: str | None = None
        self._tail = ""

    def step(self, name: str) -> None:
        now = time.monotonic()
        if self.steps and self.steps[-1]["state"] == "running":
            self.steps[-1].update(state="done", end=now)
        self.steps.append({"name": name, "state": "running", "start": now})

    def fail(self, error: str) -> None:
        """The build failed (the first call counts); the console's tail is kept, since
        the staging dir with the log is removed next."""
        if self.error is not None:
            return
        self._tail = self._read_tail()
        if self.steps and self.steps[-1]["state"] == "running":
            self.steps[-1].update(state="failed", end=time.monotonic())
        self.error = error

    def _read_tail(self) -> str:
        try:
            with open(self.console_log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 2048))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        tail = self._tail if self.error is not None else self._read_tail()
        current = self.steps[-1]["name"] if self.steps else None
        return {"name": self.name, "state": "failed" if self.error else "building",
                "step": current, "all_steps": list(BUILD_STEPS), "error": self.error,
                "seconds": round(now - self.t0, 1), "log": str(self.console_log),
                "log_tail": tail,
                "steps": [{"name": s["name"], "state": s["state"],
                           "seconds": round(s.get("end", now) - s["start"], 1)}
                          for s in self.steps]}


def rmtree_readonly(path: Path) -> None:
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            os.chmod(p, 0o644 if p.is_file() else 0o755)
    shutil.rmtree(path, ignore_errors=True)
