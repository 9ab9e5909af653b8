"""One VM at run time: its record, its qemu process, its QMP connection and events, its
readiness.

This module does the work on one VM: launch qemu and attach QMP, the lifecycle
primitives (powerdown, reboot, reset, quit, live snapshot), and what the status reports
about the guest (SSH banner; kernel and cloud-init progress read from the console log
of the current boot). Locking and state transitions are the registry's
(:mod:`vmagent.vms.registry`); the operations that combine them are in
:mod:`vmagent.vms.lifecycle` and :mod:`vmagent.vms.service`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from vmagent import rundir
from vmagent.errors import Conflict, QMPFailure, Timeout, VMAgentError
from vmagent.identity import hostkeys
from vmagent.identity.accounts import Account, from_spec
from vmagent.poll import poll_until
from vmagent.qemu import argv as qargv
from vmagent.qemu.console import ConsoleLog
from vmagent.qemu.machine import Machine
from vmagent.qemu.guest import GuestAgent
from vmagent.qemu.qmp import Monitor
from vmagent.vms.events import EventLog
from vmagent.vms.store import VMRecord

log = logging.getLogger(__name__)

_CI_DONE = re.compile(rb"Cloud-init v\. \S+ finished at")
_CI_RUNNING = re.compile(rb"Cloud-init v\. \S+ running|cloud-init\[\d+\]")
_KERNEL = re.compile(rb"Linux version \d")
_POWER_DOWN = (b"reboot: Power down", b"reboot: System halted")
QUIT_TIMEOUT = 2.0        # QMP quit unanswered this long: SIGKILL at once
QUIT_WAIT = 5.0           # quit answered (or the monitor gone): qemu exits within this
BOOT_SCAN_MAX = 8 << 20


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
        if rec.rt.launched_in:
            self.machine.launched_in = Path(rec.rt.launched_in)
        self.monitor: Monitor | None = None
        self._agent: GuestAgent | None = None
        self._events: asyncio.Task | None = None
        self.lock = asyncio.Lock()
        self.resets = 0                 # RESET events seen since attach
        self.shutdowns = 0              # SHUTDOWN events seen since attach
        self.last_event: str | None = None
        self.panicked = False           # GUEST_PANICKED seen
        self.io_error: dict | None = None   # the last BLOCK_IO_ERROR's data
        self.ssh_ready = False          # sshd greeted at least once in this boot
        self.ssh_checked = 0.0
        # what the monitor (vmagent/monitor/) saw last: the guest agent answered
        # (link), sshd greeted (net); a warning (the link down too long)
        self.link_alive = False
        self.net_alive = False
        self.warning: str | None = None
        # a new value for each boot this agent sees (vmctl names its SSH control
        # sockets with it: a master of an earlier boot is never reused, vmctl/sshmaster.py)
        self.boot_id = secrets.token_hex(8)
        # called when qemu's QMP stream ends by itself (qemu exited or died): the
        # monitor looks at once instead of at its next round
        self.on_qmp_closed: Callable[[], None] | None = None
        self._scan: tuple[int, int, dict] = (-1, -1, {})   # (offset, size, result)
        # the SSH host keys the agent made for it (None: the guest made its own)
        self.host_keys = hostkeys.load(rec.run_dir)

    @property
    def name(self) -> str:
        return self.rec.name

    @property
    def run_dir(self) -> Path:
        return self.rec.run_dir

    @property
    def accounts(self) -> list[Account]:
        acc = self.rec.rt.accounts
        return from_spec(self.rec.spec) if acc is None else [Account.from_json(a)
                                                             for a in acc]

    def people(self) -> tuple[str | None, list[str]]:
        """(owner, admins): who may operate it (besides the operators)."""
        return self.rec.rt.owner, list(self.rec.spec.admins)

    @property
    def console(self) -> ConsoleLog:
        return ConsoleLog(self.run_dir / rundir.CONSOLE_LOG)

    @property
    def event_log(self) -> EventLog:
        return EventLog(self.run_dir)

    @property
    def qga(self) -> Path:
        return self.run_dir / rundir.QGA_SOCK

    @property
    def agent(self) -> GuestAgent:
        """The guest agent's channel (one per VM, shared by every caller). A rename
        moves the socket with the run dir; an open connection is not affected."""
        if self._agent is None:
            self._agent = GuestAgent(self.qga, self.name)
        self._agent.path, self._agent.name = self.qga, self.name
        return self._agent

    # --- process and QMP --------------------------------------------------------------

    async def launch(self, argv: list[str], prefix: list[str] = ()) -> int:
        self.panicked, self.io_error, self.last_event = False, None, None
        self.link_alive = self.net_alive = False
        self.warning = None
        self.console.trim()
        before = self.console.size()          # the new boot's output starts here
        pid = await self.machine.launch(argv, prefix=prefix)
        self.rec.rt.launched_in = None
        self.reset_boot(before)
        await self.attach()
        return pid

    async def attach(self, timeout: float | None = None) -> None:
        """Connect QMP (after launch, or to re-adopt a running qemu) and watch events;
        ``timeout`` bounds the wait for qemu's greeting (a stopped qemu sends none)."""
        await self.detach()
        mon = Monitor(self.run_dir / rundir.QMP_SOCK, self.name)
        await mon.connect(timeout)
        self.monitor = mon
        self._events = asyncio.create_task(self._watch_events(mon))

    async def drain_events(self, timeout: float = 1.0) -> None:
        """qemu is gone: let the event task read what qemu sent before it went (its
        stream ends at the socket's EOF), so a last GUEST_PANICKED or SHUTDOWN counts."""
        if self._events is not None and not self._events.done():
            await asyncio.wait([self._events], timeout=timeout)

    async def detach(self) -> None:
        if self._agent is not None:
            await self._agent.close()
        if self._events is not None:
            self._events.cancel()
            self._events = None
        if self.monitor is not None:
            await self.monitor.close()
            self.monitor = None

    async def _watch_events(self, mon: Monitor) -> None:
        try:
            async for event in mon.events():
                kind = event.get("event")
                log.info("%s: QMP event %s %s", self.name, kind, event.get("data", ""))
                self.last_event = kind
                if kind == "RESET":
                    self.resets += 1
                    self.reset_boot()
                elif kind == "SHUTDOWN":
                    self.shutdowns += 1
                elif kind == "GUEST_PANICKED":
                    self.panicked = True
                elif kind == "BLOCK_IO_ERROR":
                    self.io_error = dict(event.get("data") or {})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the monitor went away with qemu
            log.debug("%s: event stream ended: %s", self.name, e)
        if self.on_qmp_closed is not None:
            self.on_qmp_closed()

    async def qmp(self, command: str, arguments: dict | None = None,
                  timeout: float | None = None) -> Any:
        if self.monitor is None:
            if not self.machine.alive():
                raise Conflict(f"VM {self.name} is not running")
            await self.attach(timeout)
        assert self.monitor is not None
        return await self.monitor.execute(command, arguments, timeout)

    def reset_boot(self, offset: int | None = None) -> None:
        """A new boot begins: readiness is judged from here on."""
        self.rec.rt.boot_offset = self.console.size() if offset is None else offset
        self.ssh_ready = False
        self.ssh_checked = 0.0
        self.net_alive = False
        self.boot_id = secrets.token_hex(8)

    # --- lifecycle primitives ---------------------------------------------------------

    async def powerdown(self, timeout: float) -> bool:
        """A clean guest shutdown: the guest agent, else the ACPI power button. True if
        qemu exited within ``timeout``."""
        if not await self.guest_power("powerdown"):
            await self.qmp("system_powerdown")
        return await self.machine.wait_gone(timeout)

    async def quit(self) -> None:
        """Stop qemu now: QMP quit; SIGKILL when it does not answer at once (a hung or
        stopped qemu) or does not exit right after."""
        hung = False
        try:
            await self.qmp("quit", timeout=QUIT_TIMEOUT)
        except Timeout:
            hung = True
            log.info("%s: quit unanswered within %gs; killing", self.name, QUIT_TIMEOUT)
        except VMAgentError as e:
            log.info("%s: quit: %s", self.name, e)
        if hung or not await self.machine.wait_gone(QUIT_WAIT):
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
        try:
            await self.agent.call("guest-shutdown", {"mode": mode}, timeout=3,
                                  no_reply=True)
            return True
        except VMAgentError as e:
            log.info("%s: guest-shutdown %s: %s", self.name, mode, e)
            if "failed" not in e.message:    # no agent at all: don't try again
                return False
        try:
            await self.agent.call("guest-exec", {
                "path": "systemctl", "arg": ["reboot" if mode == "reboot" else "poweroff"]},
                timeout=3)
            return True
        except VMAgentError as e:
            log.info("%s: guest-exec systemctl: %s", self.name, e)
            return False

    async def _wait_count(self, attr: str, before: int, timeout: float) -> bool:
        def changed() -> bool | None:
            if getattr(self, attr) != before:
                return True
            if not self.machine.alive():
                raise _Gone()
            return None
        try:
            return bool(await poll_until(changed, timeout, interval=0.2))
        except _Gone:
            return False

    async def reset(self) -> None:
        await self.qmp("system_reset")

    async def snapshot(self, tag: str, timeout: float = 600) -> dict:
        """A live internal snapshot (RAM and devices into the qcow2, then the disk)."""
        if any(s["name"] == tag for s in await self.snapshots()):
            raise Conflict(f"VM {self.name} already has a snapshot named {tag!r}")
        job = f"snap-{int(time.time() * 1000)}"
        await self.qmp("snapshot-save", {"job-id": job, "tag": tag,
                                         "vmstate": qargv.DISK_NODE,
                                         "devices": [qargv.DISK_NODE]})

        async def concluded() -> dict | None:
            jobs = {j["id"]: j for j in await self.qmp("query-jobs")}
            j = jobs.get(job, {"status": "concluded", "gone": True})
            return j if j["status"] == "concluded" else None

        j = await poll_until(concluded, timeout, interval=0.2,
                             error=f"snapshot {tag!r} of {self.name} did not finish in "
                                   f"{timeout:g}s")
        assert j is not None
        if not j.get("gone"):
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

    def boot_progress(self) -> dict:
        """What the console log of the current boot shows: kernel, cloud-init."""
        log_ = self.console
        offset, size = self.rec.rt.boot_offset, log_.size()
        if self._scan[:2] == (offset, size):
            return self._scan[2]
        data = log_.read(offset, BOOT_SCAN_MAX)
        done = _CI_DONE.search(data)
        result = {"kernel": bool(_KERNEL.search(data)),
                  "cloud_init": "done" if done else
                  "running" if _CI_RUNNING.search(data) else None,
                  "console_bytes": size}
        self._scan = (offset, size, result)
        return result

    def powered_down(self) -> bool:
        """Whether the console log ends with the guest powering itself off."""
        tail = self.console.tail(4096)
        return any(m in tail for m in _POWER_DOWN)

    def kernel_panicked(self) -> bool:
        """Whether the console log of this boot shows a kernel panic."""
        return b"Kernel panic - not syncing" in self.console.tail(16384)

    async def check_ssh(self) -> bool:
        port = self.rec.rt.ssh_port
        greeted = bool(port) and await ssh_banner("127.0.0.1", port)
        self.ssh_ready = self.ssh_ready or greeted
        self.net_alive = greeted
        self.ssh_checked = time.monotonic()
        return greeted

    async def wait_banner(self, limit: float, timeout: float = 20.0) -> bool:
        """Wait for sshd's banner with patient connections (short timeouts would only
        start more cold sshd processes under TCG)."""
        port = self.rec.rt.ssh_port
        return bool(await poll_until(lambda: ssh_banner("127.0.0.1", port, timeout=timeout),
                                     limit, interval=0.05))


class _Gone(Exception):
    """qemu exited while waiting."""
