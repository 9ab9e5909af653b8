"""The per-VM signals, once a second: ``link_alive`` and ``net_alive``, and whether QMP
answers.

* link: the guest answers. On qemu's user-mode network the host cannot ping the guest,
  so the link check is a ``guest-ping`` through qemu-guest-agent (its virtio-serial
  port), with its own timeout, on the VM's kept guest-agent connection
  (:class:`vmagent.qemu.guest.GuestAgent`: other callers take turns with it).
* net: the guest's SSH port accepts a connection *and* sshd sends its banner (qemu's
  user networking accepts on the host side before the guest does anything).
* qmp: ``query-status`` on the VM's QMP connection: what qemu says of the guest
  (running, paused, io-error, guest-panicked, ...), and whether it answers at all.

Each check of each VM is a task of its own, bounded by its timeout: a hung guest costs
its own check a timeout, never the loop or another VM. A check is not started again
while the previous one still runs. The probes are functions (the tests give the stub
VMs their own).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from vmagent.alloc.config import MonitorConfig
from vmagent.errors import VMAgentError
from vmagent.vms.vm import VM, ssh_banner

log = logging.getLogger(__name__)

Probe = Callable[[VM, float], Awaitable[Any]]


async def link_probe(vm: VM, timeout: float) -> bool:
    return await vm.agent.ping(timeout)


async def net_probe(vm: VM, timeout: float) -> bool:
    port = vm.rec.rt.ssh_port
    return bool(port) and await ssh_banner("127.0.0.1", port, timeout=timeout)


async def qmp_probe(vm: VM, timeout: float) -> str | None:
    """qemu's run state of the guest (``query-status``); None: QMP did not answer."""
    if vm.monitor is None:
        return None
    try:
        status = await vm.monitor.execute("query-status", timeout=timeout)
    except VMAgentError:
        return None
    return str(status.get("status", "unknown"))


@dataclass
class Check:
    """One periodic check of one VM: its last result and since when it holds."""

    name: str
    probe: Probe
    timeout: float
    value: Any = None               # the last result (False/None: failed)
    since: float = field(default_factory=time.monotonic)   # when the value last changed
    at: float = 0.0                 # when the last check ended
    latency: float = 0.0            # how long it took
    runs: int = 0
    backoff_max: float = 0.0        # >0: after the second slow failure in a row (a
                                    # timeout) wait 2, 4, 8 ... s, up to this; quick
                                    # refusals are not backed off
    adaptive_max: float = 0.0       # >0: the timeout follows how long recent answers
                                    # took (twice the slowest of the last 5) and grows
                                    # while it fails (x2, x4, x8), up to this
    recent: list[float] = field(default_factory=list)   # latencies of recent successes
    fails: int = 0                  # failures in a row
    slow_fails: int = 0             # of those, the ones that ran into the timeout
    not_before: float = 0.0         # (monotonic) the backoff's next start
    _task: asyncio.Task | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def limit(self) -> float:
        """This check's timeout now: the configured one, or longer for a guest whose
        answers have been slow (an overloaded host: slow is not dead)."""
        if not self.adaptive_max:
            return self.timeout
        slow = 2 * max(self.recent) if self.recent else 0.0
        failing = self.timeout * 2 ** min(self.fails, 3)   # it may just be slow: wait more
        return min(max(self.timeout, slow, failing), self.adaptive_max)

    def start(self, vm: VM, on_done: Callable[["Check"], None]) -> None:
        if not self.busy and time.monotonic() >= self.not_before:
            self._task = asyncio.create_task(self._run(vm, on_done))

    async def _run(self, vm: VM, on_done: Callable[["Check"], None]) -> None:
        t0 = time.monotonic()
        try:
            limit = self.limit
            value = await asyncio.wait_for(self.probe(vm, limit), limit + 1)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed probe is a failed check
            log.debug("%s: %s check: %s", vm.name, self.name, e)
            value = None
        now = time.monotonic()
        if value != self.value:
            self.since = now
        self.value, self.at, self.latency = value, now, now - t0
        self.runs += 1
        self.fails = 0 if value else self.fails + 1
        # a failure that used up its time (the guest took the connection and did not
        # answer) cost the guest something; a quick one (refused: sshd not up yet) did
        # not, and is asked again at the next round, so a booting guest's sshd is seen
        # within a second of its start
        slow = not value and now - t0 >= 0.9 * limit
        self.slow_fails = self.slow_fails + 1 if slow else 0
        if value:
            self.recent = (self.recent + [now - t0])[-5:]
        if self.backoff_max and self.slow_fails > 1:
            self.not_before = t0 + min(2.0 ** (self.slow_fails - 1), self.backoff_max)
        else:
            self.not_before = 0.0
        on_done(self)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


class VMSignals:
    """The checks of one running VM; :meth:`tick` starts those that are due, their
    results land on the VM (``vm.link_alive``, ``vm.net_alive``) when they end."""

    def __init__(self, vm: VM, cfg: MonitorConfig, probes: dict[str, Probe] | None = None
                 ) -> None:
        probes = {"link": link_probe, "net": net_probe, "qmp": qmp_probe, **(probes or {})}
        self.vm = vm
        self.link = Check("link", probes["link"], cfg.link_timeout, adaptive_max=5.0)
        # every net check is an sshd the guest starts: a guest that does not greet in
        # time (slow, overloaded) is asked less often, 2, 4, 8 s apart, so the
        # checks do not pile up in its sshd (a change to down is seen at once still);
        # a refused connection (sshd not started yet) is asked again every second
        self.net = Check("net", probes["net"], cfg.net_timeout, backoff_max=8.0,
                         adaptive_max=5.0)
        self.qmp = Check("qmp", probes["qmp"], min(cfg.link_timeout * 2, 2.0))
        self.qmp.value = "running"          # answering until it does not
        self.link_ever = False              # the guest agent answered in this run
        self.started = time.monotonic()

    @property
    def checks(self) -> tuple[Check, ...]:
        return self.link, self.net, self.qmp

    def tick(self) -> None:
        for check in self.checks:
            check.start(self.vm, self._landed)

    def _landed(self, check: Check) -> None:
        if check is self.link:
            self.vm.link_alive = bool(check.value)
            self.link_ever = self.link_ever or bool(check.value)
        elif check is self.net:
            self.vm.net_alive = bool(check.value)
            if check.value:
                self.vm.ssh_ready = True
                self.vm.ssh_checked = time.monotonic()

    def qmp_silent_for(self, now: float) -> float:
        """How long QMP has not answered (0: it answers)."""
        return now - self.qmp.since if self.qmp.value is None and self.qmp.runs else 0.0

    def link_down_for(self, now: float) -> float:
        """How long the link has been down after it was up in this run (0: up, or
        never up: a guest without a guest agent is not warned about)."""
        if not self.link_ever or self.link.value:
            return 0.0
        return now - self.link.since

    def stop(self) -> None:
        for check in self.checks:
            check.cancel()
        self.vm.link_alive = self.vm.net_alive = False
