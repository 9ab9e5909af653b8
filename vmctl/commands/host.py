"""``vmctl host list | show``: the configured hosts and what their agents report."""

from __future__ import annotations

from typing import Any

import click

from .. import output
from ..app import App, group, pass_app
from ..errors import CLIError

PROBE_TIMEOUT = 5.0     # per host in 'host list': one dead host must not stall the list


def _summary(doc: dict) -> dict:
    cap = doc.get("capacity") or {}
    accel = doc.get("accel") or {}
    return {"version": doc.get("version"), "accel": accel.get("name"),
            "cpus": cap.get("cpus"), "memory": cap.get("memory"),
            "vms": (doc.get("vms") or {}).get("total"),
            "running": (doc.get("vms") or {}).get("running")}


def _hosts_table(rows: list[dict]) -> Any:
    from rich.table import Table
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("", "NAME", "ADDRESS", "VERSION", "ACCEL", "CPUS", "MEMORY", "VMS"):
        table.add_column(col)
    for r in rows:
        table.add_row("*" if r["current"] else "", r["name"], r.get("address", "?"),
                      r.get("version") or ("[red]unreachable[/]" if r.get("reachable")
                                           is False else "-"),
                      str(r.get("accel") or "-"), str(r.get("cpus") or "-"),
                      output.human_size(r.get("memory")),
                      f"{r.get('running')}/{r.get('vms')}" if "vms" in r else "-")
    return table


def _host_grid(app: App, doc: dict) -> Any:
    from rich.table import Table
    cap = doc.get("capacity") or {}
    accel = doc.get("accel") or {}
    vms = doc.get("vms") or {}
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    target = app.target
    for key, value in (
            ("host", target.label if target.label == str(target.address)
             else f"{target.label} ({target.address})"),
            ("version", doc.get("version")), ("qemu", doc.get("qemu_version")),
            ("accel", f"{accel.get('name')} ({accel.get('reason')})"),
            ("cpus", cap.get("cpus")), ("memory", output.human_size(cap.get("memory"))),
            ("disk free", output.human_size(cap.get("disk_free"))),
            ("vms", f"{vms.get('running')} running of {vms.get('total')}"),
            ("state dir", doc.get("state_dir"))):
        grid.add_row(key, str(value))
    return grid


@group()
def host() -> None:
    """Agents: the configured hosts and their state."""


@host.command("list")
@click.option("--no-probe", is_flag=True, help="Do not contact the agents.")
@pass_app
def list_(app: App, no_probe: bool) -> None:
    """The hosts of the config file (and the current target), with agent versions."""
    from .. import address
    from ..client import AgentClient
    cfg = app.config
    targets: dict[str, Any] = {name: None for name in sorted(cfg.hosts)}
    rows = []
    current = app.client.target
    if current.label not in targets:
        targets = {current.label: current, **targets}
    for label, target in targets.items():
        row = {"name": label, "current": label == current.label}
        try:
            target = target or address.resolve(label, cfg)
            row["address"] = str(target.address)
            if not no_probe:
                client = AgentClient(target, timeout=PROBE_TIMEOUT)
                try:
                    row.update(_summary(client.call("host")), reachable=True)
                finally:
                    client.close()
        except CLIError as exc:
            row.update(reachable=False, error=exc.message)
        rows.append(row)
    app.out.emit({"hosts": rows}, lambda: app.out.console.print(_hosts_table(rows)),
                 quiet="\n".join(r["name"] for r in rows))


@host.command()
@pass_app
def show(app: App) -> None:
    """What the agent reports: version, accelerator, capacity, VMs."""
    doc = app.call("host")
    app.out.emit(doc, lambda: app.out.console.print(_host_grid(app, doc)),
                 quiet=doc.get("version"))


COMMANDS = (host,)
