"""One VM at run time: its qemu process, its QMP connection and events, its readiness.

The manager owns locking and state transitions; this module does the work on one VM:
launch qemu and attach QMP, the lifecycle primitives (powerdown, reboot, reset, quit,
kill, live snapshot), and what status reports about the guest (SSH banner, cloud-init
and kernel progress read from the console log of the current boot).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from vmagent.identity import hostkeys
from vmagent.qemu import argv as qargv
from vmagent.errors import Conflict, QMPFailure, Timeout, VMAgentError
from vmagent.fsutil import atomic_write
from vmagent.qemu.machine import Machine
from vmagent.qemu.qmp import Monitor, guest_agent_call
from vmagent.vms.store import VMRecord

log = logging.getLogger(__name__)

_CI_DONE = re.compile(rb"Cloud-init v\. \S+ finished at")
_CI_RUNNING = re.compile(rb"Cloud-init v\. \S+ running|cloud-init\[\d+\]")
_KERNEL = re.compile(rb"Linux version \d")
_POWER_DOWN = (b"reboot: Power down", b"reboot: System halted")


async def ssh_banner(host: str, port: int, timeout: float = 1.5) -> bool:
    """True if an SSH server greets on host:port. A bare TCP connect is not enough:
    qemu's user networking accepts connections before the guest listens."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.startswith(b"SSH-")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.close()


class VM:
    def __init__(self, rec: VMRecord) -> None:
        self.rec = rec
        self.machine = Machine(rec.run_dir)
        self.monitor: Monitor | None = None
        self._events: asyncio.Task | None = None
        self.lock = asyncio.Lock()
        self.resets = 0                 # RESET events seen since attach
        self.shutdowns = 0              # SHUTDOWN events seen since attach
        self.last_event: str | None = None
        self.ssh_ready = False
        self.ssh_checked = 0.0
        self._scan: tuple[int, int, dict] = (-1, -1, {})   # (offset, size, result)
        # the SSH host keys the agent made for it (None: the guest made its own)
        self.host_keys = hostkeys.load(rec.run_dir)

    @property
    def name(self) -> str:
        return self.rec.name

    @property
    def run_dir(self) -> Path:
        return self.rec.run_dir

    # --- process and QMP --------------------------------------------------------------

    async def launch(self, argv: list[str]) -> int:
        self.trim_console_log()
        before = self.console_size()          # the new boot's output starts here
        pid = await self.machine.launch(argv)
        self.reset_boot(before)
        await self.attach()
        return pid

    async def attach(self) -> None:
        """Connect QMP (after launch, or to re-adopt a running qemu) and watch events."""
        await self.detach()
        mon = Monitor(self.run_dir / qargv.QMP_SOCK, self.name)
        await mon.connect()
        self.monitor = mon
        self._events = asyncio.create_task(self._watch_events(mon))

    async def detach(self) -> None:
        if self._events is not None:
            self._events.cancel()
            self._events = None
        if self.monitor is not None:
            await self.monitor.close()
            self.monitor = None

    async def _watch_events(self, mon: Monitor) -> None:
        try:
            async for event in mon.client.events:
                kind = event.get("event")
                log.info("%s: QMP event %s %s", self.name, kind, event.get("data", ""))
                self.last_event = kind
                if kind == "RESET":
                    self.resets += 1
                    self.reset_boot()
                elif kind == "SHUTDOWN":
                    self.shutdowns += 1
                elif kind == "GUEST_PANICKED":
                    self.rec.rt.reason = "the guest kernel panicked"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the monitor went away with qemu
            log.debug("%s: event stream ended: %s", self.name, e)

    async def qmp(self, command: str, arguments: dict | None = None,
                  timeout: float | None = None) -> Any:
        if self.monitor is None:
            if not self.machine.alive():
                raise Conflict(f"VM {self.name} is not running")
            await self.attach()
        assert self.monitor is not None
        return await self.monitor.execute(command, arguments, timeout)

    def reset_boot(self, offset: int | None = None) -> None:
        """A new boot begins: readiness is judged from here on."""
        self.rec.rt.boot_offset = self.console_size() if offset is None else offset
        self.ssh_ready = False
        self.ssh_checked = 0.0

    # --- lifecycle primitives ---------------------------------------------------------

    async def powerdown(self, timeout: float) -> bool:
        """A clean guest shutdown: the guest agent, else the ACPI power button. True if
        qemu exited within ``timeout``."""
        if not await self.guest_power("powerdown"):
            await self.qmp("system_powerdown")
        return await self.machine.wait_gone(timeout)

    async def quit(self) -> None:
        """Stop qemu now: QMP quit, SIGKILL if that does not end it."""
        try:
            await self.qmp("quit", timeout=5)
        except VMAgentError as e:
            log.info("%s: quit: %s; killing", self.name, e)
        if not await self.machine.wait_gone(10):
            await self.machine.kill_and_wait()
        await self.detach()

    async def reboot(self, timeout: float) -> str:
        """Reboot through the guest: the guest agent, else ACPI (a power-button shutdown
        with qemu's shutdown action set to pause, then reset and continue); a hardware
        reset if the guest does not react within ``timeout``. Returns what worked."""
        resets = self.resets
        if await self.guest_power("reboot"):
            if await self._wait_count("resets", resets, min(timeout, 30)):
                return "guest-agent"
            log.info("%s: guest agent accepted the reboot but nothing happened", self.name)
        shutdowns = self.shutdowns
        await self.qmp("set-action", {"shutdown": "pause"})
        try:
            await self.qmp("system_powerdown")
            acpi = await self._wait_count("shutdowns", shutdowns, timeout)
            if not acpi:
                log.warning("%s: no ACPI shutdown within %gs; resetting", self.name, timeout)
            await self.qmp("system_reset")
            status = await self.qmp("query-status")
            if not status.get("running"):
                await self.qmp("cont")
        finally:
            await self.qmp("set-action", {"shutdown": "poweroff"})
        return "acpi" if acpi else "reset"

    async def guest_power(self, mode: str) -> bool:
        """Ask the guest agent to reboot or power off. ``guest-shutdown`` runs
        ``shutdown -r +0``, which needs logind (and D-Bus); where that fails, run
        ``systemctl`` directly. True if the guest took the order."""
        qga = self.run_dir / qargv.QGA_SOCK
        try:
            await guest_agent_call(qga, self.name, "guest-shutdown",
                                   {"mode": mode}, timeout=3, no_reply=True)
            return True
        except VMAgentError as e:
            log.info("%s: guest-shutdown %s: %s", self.name, mode, e)
            if "failed" not in e.message:    # no agent at all: don't try again
                return False
        try:
            await guest_agent_call(qga, self.name, "guest-exec", {
                "path": "systemctl", "arg": ["reboot" if mode == "reboot" else "poweroff"]},
                timeout=3)
            return True
        except VMAgentError as e:
            log.info("%s: guest-exec systemctl: %s", self.name, e)
            return False

    async def _wait_count(self, attr: str, before: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while getattr(self, attr) == before:
            if time.monotonic() > deadline or not self.machine.alive():
                return False
            await asyncio.sleep(0.2)
        return True

    async def reset(self) -> None:
        await self.qmp("system_reset")

    async def snapshot(self, tag: str, timeout: float = 600) -> dict:
        """A live internal snapshot (RAM and devices into the qcow2, then the disk)."""
        if any(s["name"] == tag for s in await self.snapshots()):
            raise Conflict(f"VM {self.name} already has a snapshot named {tag!r}")
        job = f"snap-{int(time.time() * 1000)}"
        await self.qmp("snapshot-save", {"job-id": job, "tag": tag, "vmstate": qargv.DISK_NODE,
                                         "devices": [qargv.DISK_NODE]})
        deadline = time.monotonic() + timeout
        while True:
            jobs = {j["id"]: j for j in await self.qmp("query-jobs")}
            j = jobs.get(job)
            if j is None or j["status"] == "concluded":
                break
            if time.monotonic() > deadline:
                raise Timeout(f"snapshot {tag!r} of {self.name} did not finish in "
                              f"{timeout:g}s")
            await asyncio.sleep(0.2)
        if j is not None:
            await self.qmp("job-dismiss", {"id": job})
            if j.get("error"):
                raise QMPFailure(f"snapshot {tag!r} of {self.name} failed: {j['error']}")
        snaps = {s["name"]: s for s in await self.snapshots()}
        if tag not in snaps:
            raise QMPFailure(f"snapshot {tag!r} of {self.name} is missing after saving")
        return snaps[tag]

    async def snapshots(self) -> list[dict]:
        """Internal snapshots of the disk (through QMP while running)."""
        for node in await self.qmp("query-named-block-nodes", {"flat": True}):
            if node.get("node-name") == qargv.DISK_NODE:
                return [{"name": s["name"], "date": s.get("date-sec"),
                         "vm_state_size": s.get("vm-state-size", 0)}
                        for s in node.get("image", {}).get("snapshots", [])]
        return []

    # --- readiness ----------------------------------------------------------------------

    def trim_console_log(self, limit: int = 8 << 20, keep: int = 1 << 20) -> None:
        """The log is appended to across boots: before a start, cut it to its last
        ``keep`` bytes once it is over ``limit`` (qemu is not running: no writer)."""
        path = self.run_dir / qargv.CONSOLE_LOG
        if self.console_size() <= limit:
            return
        with open(path, "rb") as f:
            f.seek(-keep, os.SEEK_END)
            tail = f.read()
        atomic_write(path, tail)

    def console_size(self) -> int:
        try:
            return (self.run_dir / qargv.CONSOLE_LOG).stat().st_size
        except OSError:
            return 0

    def boot_progress(self) -> dict:
        """What the console log of the current boot shows: kernel, cloud-init."""
        offset, size = self.rec.rt.boot_offset, self.console_size()
        if self._scan[:2] == (offset, size):
            return self._scan[2]
        try:
            with open(self.run_dir / qargv.CONSOLE_LOG, "rb") as f:
                f.seek(offset)
                data = f.read(8 << 20)
        except OSError:
            data = b""
        done = _CI_DONE.search(data)
        result = {"kernel": bool(_KERNEL.search(data)),
                  "cloud_init": "done" if done else
                  "running" if _CI_RUNNING.search(data) else None,
                  "console_bytes": size}
        self._scan = (offset, size, result)
        return result

    def powered_down(self) -> bool:
        """Whether the console log ends with the guest powering itself off."""
        try:
            with open(self.run_dir / qargv.CONSOLE_LOG, "rb") as f:
                f.seek(max(0, self.console_size() - 4096))
                tail = f.read()
        except OSError:
            return False
        return any(m in tail for m in _POWER_DOWN)

    async def check_ssh(self) -> bool:
        port = self.rec.rt.ssh_port
        self.ssh_ready = bool(port) and await ssh_banner("127.0.0.1", port)
        self.ssh_checked = time.monotonic()
        return self.ssh_ready
