"""Waiting for a VM to come up, with a live display of the boot phases.

Each phase is named by what it waits for and is marked done when that has happened:
image ready, disk created, seed written, qemu started (all four when ``create``
returns), kernel started (``status.boot.kernel``: the kernel printed its banner), SSH
answers (``status.ssh_ready``: the agent got sshd's banner), SSH login works (a real
``ssh ... true``, which leaves the connection open as this boot's SSH master,
vmctl/sshmaster.py; only when the caller checks logins), and, only when waited for,
cloud-init finished (``status.cloud_init`` is ``done``).

Ready means a login works: the rest of cloud-init (its config and final stages: the
user-data's ``runcmd``, ``packages``...) may still be running, and ``--cloud-init``
waits for it too. vmctl waits for it anyway for a VM whose host keys the agent did not
make (``status.ssh_host_keys`` null): cloud-init prints them on the console at its end,
and vmctl pins them from there before the first login. The agent's seed does not make
cloud-init restart sshd (vmagent/identity/seed.py), so a login that works keeps working.
A guest whose console shows no cloud-init at all has that phase marked "not seen".
Each phase shows the elapsed time at which it was reached; while waiting, the last
console line is shown so a slow boot is never silent. On a terminal the display is a
rich Live on stderr; otherwise one line per phase on stderr; nothing with ``--quiet``.
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

PHASES = (("image", "image ready"), ("disk", "disk created"), ("seed", "seed written"),
          ("qemu", "qemu started"), ("kernel", "kernel started"), ("ssh", "SSH answers"),
          ("login", "SSH login works"), ("cloud_init", "cloud-init finished"))
CREATE_PHASES = ("image", "disk", "seed", "qemu")
CLOUD_INIT_FINISHED = ("done", "error")


class Progress(LiveDisplay):
    def __init__(self, name: str, *, enabled: bool = True, live: bool | None = None,
                 start: float | None = None, login: bool = True,
                 cloud_init: bool = False) -> None:
        self.name = name
        self.t0 = start if start is not None else time.monotonic()
        self.phases = tuple(p for p in PHASES if (login or p[0] != "login") and
                            (cloud_init or p[0] != "cloud_init"))
        self.reached: dict[str, float] = {}
        self.skipped: dict[str, str] = {}      # phases that cannot happen, and why
        self.last_line = ""
        self.note = ""
        super().__init__(enabled=enabled, live=live)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def label(self, key: str) -> str:
        return dict(PHASES)[key]

    def expect(self, key: str, before: str | None = None) -> None:
        """Show phase ``key`` too, from now on: in its place, or right before phase
        ``before`` (when it is awaited first)."""
        if key in dict(self.phases):
            return
        keys = {k for k, _ in self.phases} | {key}
        phases = [p for p in PHASES if p[0] in keys and p[0] != key]
        at = next((i for i, p in enumerate(phases) if p[0] == before), None)
        if at is None:
            at = next((i for i, p in enumerate(PHASES) if p[0] == key))
            at = sum(1 for p in phases if PHASES.index(p) < at)
        phases.insert(at, (key, self.label(key)))
        self.phases = tuple(phases)
        self.refresh()

    def reach(self, *keys: str) -> None:
        """Mark phases done (now), once each; phases this display does not show are
        ignored."""
        shown = dict(self.phases)
        for key in keys:
            if key in self.reached or key in self.skipped or key not in shown:
                continue
            self.reached[key] = self.elapsed()
            if self.enabled and not self.live_mode:
                self.console.print(f"{self.name}: {shown[key]:<20} "
                                   f"{self.reached[key]:6.1f}s")
        self.refresh()

    def skip(self, key: str, why: str) -> None:
        """Mark a phase that will not happen (no cloud-init on this guest)."""
        if key in self.reached or key in self.skipped:
            return
        self.skipped[key] = why
        if self.enabled and not self.live_mode:
            self.console.print(f"{self.name}: {self.label(key):<20}      - ({why})")
        self.refresh()

    def waiting_for(self) -> str | None:
        """The label of the first phase neither reached nor skipped."""
        return next((label for key, label in self.phases
                     if key not in self.reached and key not in self.skipped), None)

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
        for key, label in self.phases:
            if key in self.reached:
                table.add_row("[green]✓[/]", label, f"{self.reached[key]:.1f}s")
            elif key in self.skipped:
                table.add_row("[dim]-[/]", f"[dim]{label} ({self.skipped[key]})[/]", "")
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
               poll: float = 1.0, cloud_init: bool = False) -> dict:
    """Poll ``status`` (and the console log) until the VM is ready: SSH answers and, if
    ``login`` is given, a real login works; with ``cloud_init`` (or for a VM without
    host keys from the agent, see the module's docstring) cloud-init finished too,
    before the login (or is not seen at all, for images without it). Returns the last
    status."""
    deadline = time.monotonic() + timeout
    offset: int | None = None
    last_login = ""
    next_login = 0.0
    logged_in = False
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
        ci = status.get("cloud_init")
        # each of these implies the kernel started, even if its banner was not seen
        if (status.get("boot") or {}).get("kernel") or status.get("ssh_ready") or \
                ci is not None:
            progress.reach("kernel")
        if status.get("ssh_ready"):
            progress.reach("ssh")
        # without the agent's host keys, vmctl pins those cloud-init prints at its end
        keys_on_console = login is not None and not status.get("ssh_host_keys")
        wait_ci = cloud_init or keys_on_console
        if wait_ci and status.get("ssh_ready"):
            progress.expect("cloud_init", before="login" if keys_on_console else None)
        if ci in CLOUD_INIT_FINISHED:
            progress.reach("cloud_init")
        try:
            if offset is None:
                log = call("console_log", name=name, tail=4096)
            else:
                log = call("console_log", name=name, offset=offset)
            offset = log.get("offset", offset)
            progress.console_line(log.get("data") or "")
        except CLIError:
            pass
        settling = wait_ci and ci == "running"
        if status.get("ssh_ready"):
            if login is not None and not logged_in and not (keys_on_console and settling) \
                    and time.monotonic() >= next_login:
                progress.set_note("logging in...")
                ok, last_login = login(status)
                if ok:
                    progress.reach("login")
                    logged_in = True
                else:
                    next_login = time.monotonic() + 2.0
            if (login is None or logged_in) and not settling:
                if wait_ci:
                    _no_cloud_init(progress, ci)
                progress.set_note("")
                return status
            progress.set_note("waiting for cloud-init to finish" if settling else "")
        if time.monotonic() >= deadline:
            detail = f"; last ssh error: {last_login}" if last_login else ""
            if settling:
                detail += "; SSH answers, cloud-init is still running"
            raise WaitTimeout(f"VM {name!r} was not ready within {timeout:g}s (waiting for: "
                              f"{progress.waiting_for() or 'SSH'}){detail}")
        # once SSH answers, the rest is a matter of seconds: look more often
        time.sleep(min(poll, 0.5) if status.get("ssh_ready") else poll)


def _no_cloud_init(progress: Progress, cloud_init: str | None) -> None:
    if cloud_init is None:
        progress.skip("cloud_init", "not seen on the console")
