"""The agent's services on a tmp state dir with ``tests/qemu_stub.py`` as its qemu: no
guest boots, so the registry, launcher, lifecycle, monitor and reconcile logic are tested
in a fraction of a second per operation.

The stub is installed as ``BIN/qemu-system-x86_64``, run by a symlink to this Python
named ``BIN/qemu-system-python3``: the agent trusts a pid only if ``/proc/PID/cmdline``
starts with a program named ``qemu-system*`` (:func:`vmagent.qemu.argv.owns_cmdline`),
and a ``#!/usr/bin/env python3`` script shows up there as ``python3``.

Cleanup kills only the stubs this test started (the pids they recorded in
``BIN/stub-pids``, each checked against its command line), never by a pattern.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from vmagent import rundir
from vmagent.app import Agent, Settings
from vmagent.context import RequestContext
from vmagent.images.catalog import Catalog, default_catalog_dir
from vmagent.poll import poll_until
from vmagent.qemu import disks
from vmagent.qemu.machine import read_cmdline
from vmagent.spec import Defaults
from vmagent.templates.store import Template

STUB = Path(__file__).with_name("qemu_stub.py")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdM09Ct5ZbpGEQm6BvLA/Ji8N4McDg7RPn/6+OGhCmD t@x"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa a@y"
IMAGE = "test"
CTX = RequestContext.internal()


def install_stub(bin_dir: Path) -> Path:
    """``bin_dir/qemu-system-x86_64``: the stub, with an interpreter named qemu-system."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    python = bin_dir / "qemu-system-python3"
    python.symlink_to(os.path.realpath(sys.executable))
    shebang = f"#!{python}\n"
    assert len(shebang) < 127, f"shebang too long for the kernel: {shebang}"
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(shebang + STUB.read_text().split("\n", 1)[1])
    qemu.chmod(0o755)
    return qemu


def make_qcow2(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def process_gone(pid: int) -> bool:
    """Exited, or a zombie nobody reaps yet (the stubs are daemons, reparented)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def update_json(path: Path, changes: dict) -> None:
    """Merge ``changes`` into a control file, atomically (the stub reads it any time)."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update(changes)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


class StubEnv:
    """One test's stub, control files, image and state dir, all under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.bin = base / "bin"
        self.qemu = install_stub(self.bin)
        self.state_dir = base / "state"
        self.image_file = make_qcow2(base / "base.qcow2")
        self.agents: list[Agent] = []

    # --- control --------------------------------------------------------------------

    def control(self, **switches: Any) -> None:
        """Set switches for every stub started from now on (and the running ones)."""
        update_json(self.bin / "stub-control.json", switches)

    @staticmethod
    def vm_control(run_dir: Path, **switches: Any) -> None:
        """Set switches (or triggers) of the stub running in ``run_dir``."""
        update_json(Path(run_dir) / "stub-control.json", switches)

    @staticmethod
    def log(run_dir: Path, channel: str | None = None) -> list[dict]:
        """What the stub in ``run_dir`` received (and the events it sent)."""
        try:
            lines = (Path(run_dir) / "stub-log.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = [json.loads(ln) for ln in lines]
        return [e for e in entries if channel is None or e["channel"] == channel]

    @classmethod
    def commands(cls, run_dir: Path, channel: str = "qmp") -> list[str]:
        return [e["execute"] for e in cls.log(run_dir, channel)]

    # --- processes ------------------------------------------------------------------

    def started_pids(self) -> list[int]:
        try:
            text = (self.bin / "stub-pids").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def is_ours(self, pid: int) -> bool:
        return str(self.qemu) in read_cmdline(pid)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        assert self.is_ours(pid), f"pid {pid} is not a stub of this test"
        os.kill(pid, sig)

    def cleanup(self) -> None:
        for pid in self.started_pids():
            if not process_gone(pid) and self.is_ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)      # a test may have stopped it
                    os.kill(pid, signal.SIGKILL)

    # --- the agent ------------------------------------------------------------------

    def settings(self, **overrides: Any) -> Settings:
        kw: dict[str, Any] = dict(
            state_dir=self.state_dir, catalog=Catalog.load(default_catalog_dir()),
            qemu_binary=str(self.qemu), accel_override="tcg",
            defaults=Defaults(image=IMAGE, cpus=1, memory=256 << 20, disk=1 << 30))
        kw.update(overrides)
        return Settings(**kw)

    async def agent(self, watch: bool = False, **overrides: Any) -> Agent:
        """A started agent (VMs adopted); its 1 Hz monitor is stopped unless ``watch``:
        tests call ``agent.monitor.tick()`` themselves."""
        agent = Agent(self.settings(**overrides))
        self.agents.append(agent)
        if not agent.images.exists(IMAGE):
            await agent.images.import_file(IMAGE, self.image_file)
        await agent.start()
        if not watch:
            await agent.monitor.stop()
        return agent

    @contextlib.asynccontextmanager
    async def running(self, watch: bool = False, **overrides: Any) -> AsyncIterator[Agent]:
        agent = await self.agent(watch, **overrides)
        try:
            yield agent
        finally:
            await agent.stop()


async def call(agent: Agent, op: str, **params: Any) -> Any:
    """An operation through the dispatcher (the guards included), as the agent itself."""
    return await agent.dispatcher.call(op, CTX, params)


async def create(agent: Agent, name: str, **fields: Any) -> dict:
    return await call(agent, "create", name=name, ssh_keys=[KEY], **fields)


async def until(check, timeout: float = 5.0, what: str = "the condition") -> Any:
    """Poll ``check`` (plain or async) until it is truthy; fail the test otherwise."""
    result = await poll_until(check, timeout, interval=0.02)
    assert result, f"{what} did not happen within {timeout:g}s"
    return result


def run(coro, timeout: float = 20.0) -> Any:
    """Run a test coroutine with a deadline (no pytest-asyncio here)."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def make_template(agent: Agent, name: str = "tpl") -> Template:
    """A template made by hand: a disk on the image and a random saved state, recorded
    with its size and sha256 and this host's qemu version and accelerator."""
    store = agent.templates.templates
    path = store.dir(name)
    path.mkdir()
    img = agent.images.resolve(IMAGE)
    await disks.create_overlay(img.path, img.format, path / rundir.DISK, 1 << 30)
    state = os.urandom(64 << 10)
    (path / rundir.SAVED_STATE).write_bytes(state)
    tpl = Template(name=name, image=IMAGE, cpus=1, memory=256 << 20, disk=1 << 30,
                   mac="52:54:00:12:34:56", vmgenid=str(uuid.uuid4()), hostname=name,
                   state_size=len(state), state_sha256=hashlib.sha256(state).hexdigest(),
                   accel=agent.host.accel_name, qemu_version=agent.host.version)
    store.save(tpl, path)
    return store.get(name)


def events(run_dir: Path) -> list[tuple[str, str]]:
    """The state transitions in the VM's event log, as (from, to)."""
    lines = (Path(run_dir) / "events.jsonl").read_text().splitlines()
    return [(e["from"], e["to"]) for e in map(json.loads, lines) if e["type"] == "state"]


def read_state(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "state.json").read_text())


@pytest.fixture
def stub(tmp_path, monkeypatch) -> StubEnv:
    """A StubEnv; QMP ``quit`` unanswered for 0.5 s counts as hung (not 2 s)."""
    import vmagent.vms.vm as vm_mod
    monkeypatch.setattr(vm_mod, "QUIT_TIMEOUT", 0.5)
    env = StubEnv(tmp_path)
    try:
        yield env
    finally:
        env.cleanup()
