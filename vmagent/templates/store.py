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

This module is the template store; the operations are in :mod:`vmagent.templates.service`,
the warm create in :mod:`vmagent.templates.warm`, the clone's new identity in
:mod:`vmagent.identity.reidentify`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import field
from pathlib import Path
from typing import Any

from vmagent import rundir
from vmagent.errors import ImageError, NotFound, VMAgentError
from vmagent.fsutil import (FormatError, StagedDir, fsync_dir, read_record, remove_dir,
                            sha256_file, sweep, write_record)
from vmagent.spec import check_name

log = logging.getLogger(__name__)

RECORD_FORMAT = 1        # 0: vmagent 0.1's unversioned template.json (same keys)


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
        return self.path / rundir.DISK

    @property
    def state_path(self) -> Path:
        assert self.path is not None
        return self.path / rundir.SAVED_STATE


class TemplateStore:
    """``STATE/templates``: one directory per template, staged under a hidden name."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in sweep(self.root):
            log.warning("removed leftover template directory %s", leftover)
        self._verified: dict[str, tuple] = {}   # name -> stat key of the verified file

    def dir(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and (p / rundir.TEMPLATE_RECORD).is_file())

    def exists(self, name: str) -> bool:
        return (self.dir(name) / rundir.TEMPLATE_RECORD).is_file()

    def get(self, name: str) -> Template:
        check_name(name)
        path = self.dir(name)
        try:
            data = read_record(path / rundir.TEMPLATE_RECORD, RECORD_FORMAT)
        except FileNotFoundError:
            raise NotFound(f"no template named {name!r} (see 'vmctl template list')",
                           template=name) from None
        except (OSError, ValueError, FormatError) as e:
            raise ImageError(f"template {name!r}: unreadable {rundir.TEMPLATE_RECORD}: "
                             f"{e}") from e
        return Template.from_json(data, path)

    def list(self) -> list[Template]:
        out = []
        for n in self.names():
            with contextlib.suppress(VMAgentError):
                out.append(self.get(n))
        return out

    def save(self, tpl: Template, directory: Path) -> None:
        write_record(directory / rundir.TEMPLATE_RECORD, tpl.to_json(), RECORD_FORMAT,
                     mode=0o444)

    def staged(self, name: str) -> StagedDir:
        return StagedDir(self.root, name)

    def commit(self, staged: StagedDir, name: str) -> Path:
        return staged.commit(self.dir(name))

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
                if p.name != rundir.DISK:
                    p.unlink()
            fsync_dir(path)
            return
        remove_dir(path)

    def orphans(self) -> list[str]:
        """Directories of removed templates kept for their disk."""
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and p.is_dir()
                      and not (p / rundir.TEMPLATE_RECORD).exists())
