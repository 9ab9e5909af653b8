"""Printing: one JSON document with ``--json``, rich tables and lines otherwise.

rich is imported when something is drawn for people (it costs more to import than the
rest of vmctl), never for ``--json`` or ``--quiet``.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Iterable

import click

from vmagent.spec import format_size

if TYPE_CHECKING:                      # pragma: no cover
    from rich.console import Console
    from rich.table import Table

STATE_STYLE = {"running": "green", "stopped": "dim", "broken": "bold red",
               "creating": "yellow", "starting": "yellow", "stopping": "yellow",
               "deleting": "yellow"}


class Output:
    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet

    @property
    def console(self) -> Console:
        # built per use: click's CliRunner swaps sys.stdout for each invocation
        from rich.console import Console
        return Console(file=sys.stdout, highlight=False, soft_wrap=True)

    @property
    def err_console(self) -> Console:
        from rich.console import Console
        return Console(file=sys.stderr, highlight=False, soft_wrap=True)

    def json(self, doc: Any) -> None:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))

    def emit(self, doc: Any, human: Any = None, quiet: str | None = None) -> None:
        """``--json``: the document; ``--quiet``: the ``quiet`` line (if any); else
        ``human`` (a rich renderable, a string, or a callable printing itself)."""
        if self.json_mode:
            self.json(doc)
        elif self.quiet:
            if quiet:
                click.echo(quiet)
        elif callable(human):
            human()
        elif human is not None:
            self.console.print(human)

    def info(self, message: str) -> None:
        """A progress/status line for people: on stderr, never with --quiet."""
        if not self.quiet:
            self.err_console.print(message)


def size(value: Any) -> str:
    if isinstance(value, int):
        return format_size(value)
    return "-" if value is None else str(value)


def human_size(value: Any) -> str:
    """Approximate binary size for capacities: 23.5G."""
    if not isinstance(value, (int, float)):
        return "-"
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= factor:
            return f"{value / factor:.1f}{unit}"
    return f"{int(value)}B"


def _state(status: dict) -> str:
    state = status.get("state", "?")
    style = STATE_STYLE.get(state, "")
    return f"[{style}]{state}[/]" if style else state


def readiness(status: dict) -> str:
    if status.get("state") != "running":
        return "-"
    if status.get("ssh_ready"):
        return "ssh"
    boot = status.get("boot") or {}
    if status.get("cloud_init") == "running":
        return "cloud-init"
    return "kernel" if boot.get("kernel") else "booting"


def vm_table(vms: Iterable[dict]) -> Table:
    """The VMs; with a HOST column when they come from several hosts (``host``)."""
    from rich.table import Table
    vms = list(vms)
    hosts = any("host" in vm for vm in vms)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in (("HOST",) if hosts else ()) + ("NAME", "STATE", "READY", "IMAGE", "CPUS",
                                               "MEMORY", "DISK", "SSH"):
        table.add_column(col)
    for vm in vms:
        spec = vm.get("spec") or {}
        ssh = (f"{vm.get('ssh_user')}@{vm.get('ssh_host')}:{vm.get('ssh_port')}"
               if vm.get("ssh_port") else "-")
        row = [vm.get("name", "?"), _state(vm), readiness(vm), str(spec.get("image")),
               str(spec.get("cpus")), size(spec.get("memory")), size(spec.get("disk")), ssh]
        table.add_row(*([str(vm.get("host"))] if hosts else []), *row)
    return table


def vm_details(vm: dict) -> Table:
    spec = vm.get("spec") or {}
    boot = vm.get("boot") or {}
    from rich.table import Table
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("name", vm.get("name")), ("state", _state(vm)),
        ("reason", vm.get("reason")), ("warning", vm.get("warning")),
        ("alive", f"link {_yes(vm.get('link_alive'))}, net {_yes(vm.get('net_alive'))}"
         if vm.get("state") == "running" else None),
        ("restart", f"{vm.get('restart')} ({vm.get('restarts') or 0} restarts)"
         if vm.get("restart") else None),
        ("image", spec.get("image")), ("cpus", spec.get("cpus")),
        ("memory", size(spec.get("memory"))), ("disk", size(spec.get("disk"))),
        ("segment", spec.get("segment")), ("gpus", spec.get("gpus") or None),
        ("admins", ", ".join(spec.get("admins") or [])),
        ("ssh", f"{vm.get('ssh_user')}@{vm.get('ssh_host')} port {vm.get('ssh_port')}"
         if vm.get("ssh_port") else None),
        ("ssh ready", _yes(vm.get("ssh_ready"))), ("cloud-init", vm.get("cloud_init")),
        ("kernel booted", _yes(boot.get("kernel")) if vm.get("state") == "running" else None),
        ("pid", vm.get("pid")), ("accel", vm.get("accel")),
        ("created", vm.get("created")), ("run dir", vm.get("run_dir")),
    ]
    for key in ("cpu_guarantee", "cpu_limit", "ram_guarantee", "ram_limit"):
        if spec.get(key) is not None:
            rows.append((key.replace("_", " "), spec[key] if "cpu" in key
                         else size(spec[key])))
    for key, value in rows:
        if value is not None and value != "":
            table.add_row(key, str(value))
    return table


def _yes(value: Any) -> str | None:
    return None if value is None else ("yes" if value else "no")


def image_table(images: Iterable[dict], catalog: Iterable[dict]) -> Table:
    from rich.table import Table
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "STATUS", "FORMAT", "SIZE", "BOOT", "DESCRIPTION"):
        table.add_column(col)
    have = set()
    for img in images:
        have.add(img.get("name"))
        table.add_row(img.get("name", "?"), "[green]stored[/]", str(img.get("format")),
                      size(img.get("virtual_size")), str(img.get("boot")),
                      img.get("description") or "")
    for entry in catalog:
        if entry.get("name") in have:
            continue
        how = [w for w, ok in (("pullable", "url" in entry or "base" in entry),
                                ("buildable", "build" in entry)) if ok]
        table.add_row(entry.get("name", "?"), f"[dim]{', '.join(how) or '-'}[/]",
                      str(entry.get("format") or "-"), "-", str(entry.get("boot") or "-"),
                      entry.get("description") or "")
    return table
