"""Broken VMs brought back by their restart policy (the spec's ``restart``):

* ``never``: it stays broken until someone acts;
* ``on-failure`` (the default in segment ``default``): restarted when the monitor found
  it broken (qemu died, the guest panicked or paused on an I/O error, QMP hung);
* ``always``: also when the guest powered itself off.

A VM its owner (or an operator) stopped is never restarted: only what the monitor
itself found is healed (and, when the agent starts, the VMs found broken then: their
qemu died while the agent was away, or the host rebooted), never the result of an
operation. Restarts back off
exponentially (``restart_backoff`` seconds, doubled for every restart in the window, at
most ``restart_backoff_max``), and after ``crash_loop_restarts`` restarts within
``crash_loop_window`` seconds the VM stays broken with the reason "crash loop" until an
operator acts: ``start`` or ``hard_reset`` clears the count
(:meth:`vmagent.vms.lifecycle.Lifecycle.start`).

:func:`plan` is pure; :class:`Healer` keeps the due restarts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vmagent.alloc.config import MonitorConfig
from vmagent.vms.state import State
from vmagent.vms.vm import VM

log = logging.getLogger(__name__)

CRASH_LOOP = "crash loop"


@dataclass(frozen=True)
class Plan:
    restart: bool
    delay: float = 0.0
    reason: str | None = None       # why not (the crash loop), for the state's reason


def recent(times: list[float], now: float, cfg: MonitorConfig) -> list[float]:
    return [t for t in times if now - t < cfg.crash_loop_window]


def plan(policy: str, state: State, times: list[float], now: float,
         cfg: MonitorConfig, reason: str | None = None) -> Plan:
    """Whether (and after how long) a VM the monitor found ``state`` (broken, or
    stopped by its guest) is restarted, given its recent restart times."""
    if policy == "never" or (state == State.STOPPED and policy != "always"):
        return Plan(False)
    if state not in (State.BROKEN, State.STOPPED):
        return Plan(False)
    n = len(recent(times, now, cfg))
    if n >= cfg.crash_loop_restarts:
        window = f"{cfg.crash_loop_window:g}s"
        return Plan(False, reason=f"{CRASH_LOOP}: {n} restarts within {window}"
                                  f"{f'; last: {reason}' if reason else ''}")
    delay = min(cfg.restart_backoff * (2 ** n), cfg.restart_backoff_max)
    return Plan(True, delay)


class Healer:
    """The restarts that are due, by VM name (in memory: a restart pending when the
    agent stops is not done after; the VM stays broken, as it was found)."""

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        # name -> (monotonic time of the restart, the state change it answers)
        self._due: dict[str, tuple[float, float | None]] = {}

    def found(self, vm: VM, now_wall: float | None = None) -> Plan:
        """The monitor found the VM broken or stopped by its guest: plan its restart."""
        rt = vm.rec.rt
        p = plan(vm.rec.spec.restart_policy, rt.state, rt.restart_times,
                 now_wall or time.time(), self.cfg, rt.reason)
        if p.restart:
            self._due[vm.name] = (time.monotonic() + p.delay, rt.changed_at)
            log.info("%s: restart (policy %s) in %.1fs", vm.name,
                     vm.rec.spec.restart_policy, p.delay)
        return p

    def due(self, vm: VM, now: float) -> bool:
        """Whether its restart is due; a VM whose state changed since it was found
        (its owner stopped or started it) is not restarted, and forgotten."""
        entry = self._due.get(vm.name)
        if entry is None:
            return False
        if entry[1] != vm.rec.rt.changed_at:
            self.forget(vm.name)
            return False
        return now >= entry[0]

    def pending(self) -> list[str]:
        return sorted(self._due)

    def forget(self, name: str) -> None:
        self._due.pop(name, None)

    def restarted(self, vm: VM, now_wall: float | None = None) -> None:
        """Count a restart (kept in the VM's state file: the window outlives the
        agent)."""
        self.forget(vm.name)
        rt = vm.rec.rt
        now = now_wall or time.time()
        rt.restart_times = recent(rt.restart_times, now, self.cfg) + [now]
        rt.restarts += 1
