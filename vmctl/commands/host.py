"""``vmctl host list | show``: the configured hosts and what their agents report."""

from __future__ import annotations

import click
from rich.table import Table

from .. import address, output
from ..client import AgentClient
from ..errors import CLIError
from ..main import App, pass_app


def _summary(doc: dict) -> dict:
    cap = doc.get("capacity") or {}
    accel = doc.get("accel") or {}
    return {"version": doc.get("version"), "accel": accel.get("name"),
            "cpus": cap.get("cpus"), "memory": cap.get("memory"),
            "vms": (doc.get("vms") or {}).get("total"),
            "running": (doc.get("vms") or {}).get("running")}


def register(cli: click.Group) -> None:
    @cli.group()
    def host() -> None:
        """Agents: the configured hosts and their state."""

    @host.command("list")
    @click.option("--no-probe", is_flag=True, help="Do not contact the agents.")
    @pass_app
    def list_(app: App, no_probe: bool) -> None:
        """The hosts of the config file (and the current target), with agent versions."""
        cfg = app.config
        targets = {name: None for name in sorted(cfg.hosts)}
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
                    client = AgentClient(target, timeout=5.0)
                    try:
                        row.update(_summary(client.call("host")), reachable=True)
                    finally:
                        client.close()
            except CLIError as exc:
                row.update(reachable=False, error=exc.message)
            rows.append(row)
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
        app.out.emit({"hosts": rows}, table,
                     quiet="\n".join(r["name"] for r in rows))

    @host.command()
    @pass_app
    def show(app: App) -> None:
        """What the agent reports: version, accelerator, capacity, VMs."""
        doc = app.call("host")
        cap = doc.get("capacity") or {}
        accel = doc.get("accel") or {}
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for key, value in (
                ("host", app.target.label if app.target.label == str(app.target.address)
                 else f"{app.target.label} ({app.target.address})"),
                ("version", doc.get("version")), ("qemu", doc.get("qemu_version")),
                ("accel", f"{accel.get('name')} ({accel.get('reason')})"),
                ("cpus", cap.get("cpus")), ("memory", output.human_size(cap.get("memory"))),
                ("disk free", output.human_size(cap.get("disk_free"))),
                ("vms", f"{(doc.get('vms') or {}).get('running')} running of "
                        f"{(doc.get('vms') or {}).get('total')}"),
                ("state dir", doc.get("state_dir"))):
            grid.add_row(key, str(value))
        app.out.emit(doc, grid, quiet=doc.get("version"))
