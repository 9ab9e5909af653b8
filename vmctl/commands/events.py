"""``vmctl events [NAME] [--follow]``: the VMs' event logs (the ``events`` operation):
state changes with their reasons, restarts by the restart policy, crash loops, warnings,
operations. Without NAME, the events of every VM the caller may operate, merged by
time."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from ..app import App, command, pass_app
from ..errors import CLIError
from .common import vm_name

FOLLOW_INTERVAL = 1.0


def event_line(e: dict[str, Any], with_name: bool) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time", 0)))
    kind = e.get("type", "?")
    if kind == "state":
        what = f"{e.get('from')} -> {e.get('to')}"
    elif kind == "restart":
        what = f"restart #{e.get('restarts')} (policy {e.get('policy')})"
    elif kind == "operation":
        what = f"{e.get('op')} by {e.get('user')}: {e.get('result')}"
    elif kind in ("warning", "warning_cleared"):
        what = f"{kind.replace('_', ' ')}: {e.get('warning')}"
    else:
        what = kind.replace("_", " ")
    reason = e.get("reason")
    if reason and kind != "warning":
        what += f" ({reason})"
    return (f"{when}  {e.get('vm', ''):<16} " if with_name else f"{when}  ") + what


def _names(app: App, name: str | None) -> list[str]:
    if name:
        return [vm_name(name)]
    return [vm["name"] for vm in app.call("list").get("vms", [])]


def _read(app: App, names: list[str], limit: int,
          since: dict[str, float] | None = None) -> list[dict[str, Any]]:
    out = []
    for n in names:
        params: dict[str, Any] = {"name": n, "limit": limit}
        if since is not None and n in since:
            params["since"] = since[n]
        try:
            evs = app.call("events", **params).get("events", [])
        except CLIError as e:
            if e.code == "not_found" and len(names) > 1:
                continue                    # deleted meanwhile
            raise
        out += [{**ev, "vm": n} for ev in evs]
    return sorted(out, key=lambda ev: ev.get("time", 0))


@command()
@click.argument("name", required=False, metavar="[NAME]")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--tail", "-n", "lines", type=click.IntRange(1, 1000), default=20,
              show_default=True, help="How many of the last events to show first (per VM).")
@pass_app
def events(app: App, name: str | None, follow: bool, lines: int) -> None:
    """A VM's events (state changes and why, restarts, warnings); without NAME, those of
    all your VMs. With --follow, new ones as they come (Ctrl-C ends)."""
    names = _names(app, name)
    evs = _read(app, names, lines)
    if app.json and not follow:
        app.out.json({"events": evs})
        return
    many = name is None

    def show(batch: list[dict[str, Any]]) -> None:
        for e in batch:
            click.echo(json.dumps(e, sort_keys=True) if app.json else event_line(e, many))

    show(evs)
    if not evs and not follow and not app.json:
        app.out.info("no events")
    last = {n: 0.0 for n in names}
    for e in evs:
        last[e["vm"]] = max(last.get(e["vm"], 0.0), e.get("time", 0.0))
    try:
        while follow:
            time.sleep(FOLLOW_INTERVAL)
            if not name:                     # VMs created meanwhile
                for n in _names(app, None):
                    last.setdefault(n, time.time() - FOLLOW_INTERVAL * 2)
            batch = _read(app, list(last), 1000, since=last)
            for e in batch:
                last[e["vm"]] = max(last[e["vm"]], e.get("time", 0.0))
            show(batch)
    except KeyboardInterrupt:
        pass


COMMANDS = (events,)
