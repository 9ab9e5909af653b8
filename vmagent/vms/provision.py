"""A new VM's run dir: its runtime identity (MAC, vmgenid, instance-id, SSH port), the
overlay disk on its base, the cloud-init seed and the files a caller adds (host keys, a
clone's marker), built in a staged directory that becomes the VM's with one rename."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

from vmagent import rundir
from vmagent.identity import seed
from vmagent.qemu import argv as qargv, disks
from vmagent.spec import VMSpec
from vmagent.vms.launcher import PortAllocator
from vmagent.vms.store import Runtime, Store, VMRecord, now_iso

# adds files to a staged run dir before it is committed
Extra = Callable[[Path], None]


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


class Provisioner:
    def __init__(self, store: Store, ports: PortAllocator) -> None:
        self.store = store
        self.ports = ports

    def new_runtime(self, name: str, mac: str | None = None) -> Runtime:
        """A new VM's identity; it counts as being created until its create answers."""
        return Runtime(mac=mac or random_mac(), vmgenid=str(uuid.uuid4()),
                       instance_id=seed.new_instance_id(name), created=now_iso(),
                       ssh_port=self.ports.allocate(), creating=True,
                       device_model=qargv.DEVICE_MODEL)

    def record(self, spec: VMSpec, rt: Runtime) -> VMRecord:
        """The record of a VM that is not staged (a dry run)."""
        return VMRecord(spec.name, self.store.run_dir(spec.name), spec, rt)

    async def stage(self, spec: VMSpec, rt: Runtime, base: Path, base_format: str,
                    files: dict[str, bytes], extra: Extra | None = None) -> VMRecord:
        """Build the run dir (overlay, seed, spec, state; ``extra(dir)`` adds more) and
        commit it; nothing is left on failure (FileExistsError if the name was taken)."""
        with self.store.staged(spec.name) as staged:
            await disks.create_overlay(base, base_format, staged.path / rundir.DISK,
                                       spec.disk)
            seed.write_seed_iso(staged.path / rundir.SEED, files)
            if extra is not None:
                extra(staged.path)
            rec = VMRecord(spec.name, staged.path, spec, rt)
            self.store.save(rec)
            self.store.commit(staged, rec)
        return rec
