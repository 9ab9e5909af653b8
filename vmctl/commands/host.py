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
            "running": (doc.get("vms") or {}).get("running"),
            "agent_name": doc.get("name"), "segments": doc.get("segments"),
            "resources": doc.get("resources"),
            "enforcement": ((doc.get("allocation") or {}).get("enforcement") or {})
            .get("version")}


def _resource(res: dict | None, key: str, free: bool = False) -> str:
    """guaranteed/allocatable/total (and what is free), for people."""
    r = (res or {}).get(key)
    if not r or (key == "gpu" and not r.get("total")):
        return "-"
    if key == "memory":
        f = output.human_size
    else:
        def f(v: Any) -> str:
            return f"{v:g}" if isinstance(v, (int, float)) else "-"
    text = f"{f(r.get('guaranteed'))}/{f(r.get('allocatable'))}/{f(r.get('total'))}"
    return text + (f" ({f(r.get('free'))} free)" if free else "")


def _hosts_table(rows: list[dict]) -> Any:
    from rich.table import Table
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("", "NAME", "ADDRESS", "VERSION", "SEGMENTS"):
        table.add_column(col, overflow="fold")
    # guaranteed/allocatable/total: what the VMs hold, what the host offers them, all
    for col in ("CPU G/A/T", "RAM G/A/T", "GPU G/A/T", "VMS"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        res = r.get("resources")
        table.add_row("*" if r["current"] else "", r["name"], r.get("address", "?"),
                      r.get("version") or ("[red]unreachable[/]" if r.get("reachable")
                                           is False else "-"),
                      ",".join(r.get("segments") or []) or "-",
                      _resource(res, "cpu"), _resource(res, "memory"),
                      _resource(res, "gpu"),
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
            ("name", doc.get("name")),
            ("segments", ", ".join(doc.get("segments") or []) or None),
            ("cpu g/a/t", _resource(doc.get("resources"), "cpu", True) + " cores"),
            ("ram g/a/t", _resource(doc.get("resources"), "memory", True)),
            ("gpu g/a/t", _resource(doc.get("resources"), "gpu", True)),
            ("enforcement", ((doc.get("allocation") or {}).get("enforcement") or {})
             .get("version")),
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
    """The hosts of the config file (and the current target): agent versions, segments
    and, per resource, guaranteed/allocatable of total (free). All asked at once."""
    from concurrent.futures import ThreadPoolExecutor

    from .. import address
    from ..client import AgentClient
    cfg = app.config
    targets: dict[str, Any] = {name: None for name in sorted(cfg.hosts)}
    current = app.client.target
    if current.label not in targets:
        targets = {current.label: current, **targets}
    from .. import localagent
    mine = localagent.paths().socket
    if "local-user" not in targets and localagent.answers(mine):     # vmctl --local
        targets["local-user"] = address.local_target(str(mine))

    def one(label: str) -> dict:
        row = {"name": label, "current": label == current.label}
        try:
            target = targets[label] or address.resolve(label, cfg)
            row["address"] = str(target.address)
            if not no_probe:
                client = AgentClient(target, timeout=PROBE_TIMEOUT)
                try:
                    row.update(_summary(client.call("host")), reachable=True)
                finally:
                    client.close()
        except CLIError as exc:
            row.update(reachable=False, error=exc.message)
        return row
    with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        rows = list(pool.map(one, targets))
    app.out.emit({"hosts": rows}, lambda: app.out.console.print(_hosts_table(rows)),
                 quiet="\n".join(r["name"] for r in rows))


@host.command()
@pass_app
def show(app: App) -> None:
    """What the agent reports: version, accelerator, capacity, VMs."""
    doc = app.call("host")
    app.out.emit(doc, lambda: app.out.console.print(_host_grid(app, doc)),
                 quiet=doc.get("version"))


def _log_line(e: dict) -> str:
    target = (e.get("target") or {}).get("name") or ""
    err = e.get("error") or {}
    return (f"{e.get('time')}  {e.get('user'):<12} {e.get('transport'):<5} "
            f"{e.get('operation'):<14} {target:<16} {e.get('result')}"
            + (f": {err.get('message')}" if err else ""))


@host.command("log")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new entries.")
@click.option("--tail", "-n", "lines", type=click.IntRange(1), default=50,
              show_default=True, help="How many of the last entries to show first.")
@pass_app
def log(app: App, follow: bool, lines: int) -> None:
    """The audit log of the agent: who changed what, when (operators)."""
    import time
    doc = app.call("host_log", tail=lines * 1024)
    entries = doc.get("entries", [])[-lines:]
    if app.json and not follow:
        app.out.json({"entries": entries, "offset": doc.get("offset")})
        return
    for e in entries:
        click.echo(_log_line(e) if not app.json else __import__("json").dumps(e))
    offset = doc.get("offset", 0)
    while follow:
        time.sleep(1.0)
        doc = app.call("host_log", offset=offset)
        offset = doc.get("offset", offset)
        for e in doc.get("entries", []):
            click.echo(_log_line(e) if not app.json else __import__("json").dumps(e))


COMMANDS = (host,)
