"""Broken VMs found: what the signals and qemu's events say is wrong with a running VM.

* qemu gone (not asked to): :meth:`Lifecycle.mark_gone` decides stopped (the guest
  powered off) or broken (it died, or the kernel panicked);
* QMP not answering for ``qmp_timeout`` seconds: broken (qemu hangs);
* the guest paused by an I/O error (``BLOCK_IO_ERROR``, a ``STOP`` with qemu's status
  ``io-error``: a full disk pauses it rather than losing writes): broken, with the
  error (``No space left on device``);
* a guest panic (pvpanic's ``GUEST_PANICKED``, qemu's status ``guest-panicked``):
  broken;
* the link down for ``link_down_warning`` seconds while qemu runs: a warning (the VM
  stays running; ``status`` and the metrics show it), cleared when it answers again.

:func:`diagnose` is pure: the tests give it what a VM shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmagent.alloc.config import MonitorConfig
from vmagent.monitor.signals import VMSignals
from vmagent.vms.lifecycle import PANICKED
from vmagent.vms.vm import VM

IO_ERROR = "paused by an I/O error"
QMP_SILENT = "QMP not answering"
LINK_DOWN = "link down"


@dataclass(frozen=True)
class Finding:
    broken: str | None = None       # the reason it is broken (None: it is not)
    warning: str | None = None


def io_error_reason(data: dict | None) -> str:
    """``paused by an I/O error: write on hd0: No space left on device``."""
    if not data:
        return IO_ERROR
    what = data.get("operation", "access")
    where = data.get("node-name") or data.get("device") or "a disk"
    why = data.get("reason") or ("No space left on device" if data.get("nospace")
                                 else "error")
    return f"{IO_ERROR}: {what} on {where}: {why}"


def diagnose(status: str | None, qmp_silent: float, link_down: float,
             io_error: dict | None, panicked: bool, cfg: MonitorConfig) -> Finding:
    """What is wrong, from qemu's last answered run state (``status``), how long QMP
    has been silent and the link down (seconds), the last I/O error event and whether
    the guest panicked."""
    if panicked or status == "guest-panicked":
        return Finding(broken=PANICKED)
    if status == "io-error":
        return Finding(broken=io_error_reason(io_error))
    if qmp_silent >= cfg.qmp_timeout:
        return Finding(broken=f"{QMP_SILENT} for {qmp_silent:.0f}s (qemu hangs)")
    if link_down >= cfg.link_down_warning:
        return Finding(warning=f"{LINK_DOWN} for {link_down:.0f}s: the guest agent does "
                               "not answer while qemu runs")
    return Finding()


def examine(vm: VM, signals: VMSignals, cfg: MonitorConfig, now: float) -> Finding:
    return diagnose(signals.qmp.value, signals.qmp_silent_for(now),
                    signals.link_down_for(now), vm.io_error, vm.panicked, cfg)
