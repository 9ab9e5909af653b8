"""Waiting for a VM to come up, with a live display of the boot phases.

Milestones: image ready, disk, seed, qemu started (done when ``create`` returns), kernel
booting (``status.boot.kernel``), cloud-init running (``status.cloud_init``), SSH ready
(``status.ssh_ready``, cloud-init no longer running, and then a real ``ssh ... true``
logs in). Each shows the elapsed
time at which it was reached; while waiting, the last console line is shown so a slow
boot is never silent. On a terminal the display is a rich Live on stderr; otherwise one
line per milestone on stderr; nothing with ``--quiet``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Group
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from .errors import CLIError, WaitTimeout
from .live import LiveDisplay, last_line

PHASES = (("image", "image ready"), ("disk", "disk"), ("seed", "seed"),
          ("qemu", "qemu started"), ("kernel", "kernel booting"),
          ("cloud_init", "cloud-init running"), ("ssh", "SSH ready"))
CREATE_PHASES = ("image", "disk", "seed", "qemu")


class Progress(LiveDisplay):
    def __init__(self, name: str, *, enabled: bool = True, live: bool | None = None,
                 start: float | None = None) -> None:
        self.name = name
        self.t0 = start if start is not None else time.monotonic()
        self.reached: dict[str, float] = {}
        self.last_line = ""
        self.note = ""
        super().__init__(enabled=enabled, live=live)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def reach(self, *keys: str) -> None:
        for key in keys:
            if key in self.reached:
                continue
            self.reached[key] = self.elapsed()
            if self.enabled and not self.live_mode:
                label = dict(PHASES)[key]
                self.console.print(f"{self.name}: {label:<20} {self.reached[key]:6.1f}s")
        self.refresh()

    def console_line(self, text: str) -> None:
        line = last_line(text)
        if line:
            self.last_line = line
            self.refresh()

    def set_note(self, note: str) -> None:
        self.note = note
        self.refresh()

    def _render(self, final: bool = False) -> Any:
        table = Table.grid(padding=(0, 2))
        table.add_column(width=2)
        table.add_column()
        table.add_column(justify="right")
        pending_shown = False
        for key, label in PHASES:
            if key in self.reached:
                table.add_row("[green]✓[/]", label, f"{self.reached[key]:.1f}s")
            elif not pending_shown and not final:
                pending_shown = True
                table.add_row(Spinner("dots"), f"[bold]{label}[/]", f"{self.elapsed():.1f}s")
            else:
                table.add_row(" ", f"[dim]{label}[/]", "")
        parts: list[Any] = [Text(f"{self.name}", style="bold"), table]
        if not final and (self.note or self.last_line):
            parts.append(Text(f"  {self.note or ''}{'  ' if self.note else ''}"
                              f"console: {self.last_line}", style="dim", overflow="ellipsis",
                              no_wrap=True))
        return Group(*parts)


def wait_ready(call: Callable[..., dict], name: str, progress: Progress, *,
               timeout: float, login: Callable[[dict], tuple[bool, str]] | None,
               poll: float = 1.0) -> dict:
    """Poll ``status`` (and the console log) until the VM is ready: SSH answers and, if
    ``login`` is given, a real login works. Returns the last status."""
    deadline = time.monotonic() + timeout
    offset: int | None = None
    last_login = ""
    next_login = 0.0
    while True:
        status = call("status", name=name)
        state = status.get("state")
        if state == "broken":
            raise CLIError(f"VM {name!r} is broken: {status.get('reason') or 'qemu exited'}",
                           "qemu_failed", details={"status": status})
        if state in ("stopped", "stopping", "deleting"):
            raise CLIError(f"VM {name!r} is {state}; start it with 'vmctl start {name}'",
                           "conflict")
        if state == "running":
            progress.reach(*CREATE_PHASES)
        boot = status.get("boot") or {}
        if boot.get("kernel"):
            progress.reach("kernel")
        if status.get("cloud_init") in ("running", "done", "error"):
            progress.reach("kernel", "cloud_init")
        try:
            if offset is None:
                log = call("console_log", name=name, tail=4096)
            else:
                log = call("console_log", name=name, offset=offset)
            offset = log.get("offset", offset)
            progress.console_line(log.get("data") or "")
        except CLIError:
            pass
        # cloud-init restarts sshd while it configures the guest (e.g. ssh_pwauth): a
        # login that works while it runs may fail a moment later, so ready means SSH
        # answers *and* cloud-init finished (or is not seen at all, for images without it)
        settling = status.get("cloud_init") == "running"
        if status.get("ssh_ready") and settling:
            progress.set_note("SSH answers; cloud-init is still running")
        elif status.get("ssh_ready"):
            if login is None:
                progress.reach("kernel", "ssh")
                return status
            if time.monotonic() >= next_login:
                progress.set_note("logging in...")
                ok, last_login = login(status)
                if ok:
                    progress.set_note("")
                    progress.reach("kernel", "cloud_init", "ssh")
                    return status
                next_login = time.monotonic() + 2.0
        if time.monotonic() >= deadline:
            missing = [label for key, label in PHASES if key not in progress.reached]
            detail = f"; last ssh error: {last_login}" if last_login else ""
            if settling:
                detail += "; cloud-init is still running"
            raise WaitTimeout(f"VM {name!r} was not ready within {timeout:g}s (waiting for: "
                              f"{missing[0] if missing else 'SSH'}){detail}")
        # once SSH answers, the end of cloud-init is a matter of seconds: look more often
        time.sleep(min(poll, 0.5) if status.get("ssh_ready") else poll)
