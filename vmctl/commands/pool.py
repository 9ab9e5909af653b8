"""``vmctl pool create | list | show | rm``: warm pools, clones of a template kept
restored and paused by the agent; ``vmctl create NAME --pool P`` and ``vmctl run
--pool P`` take one (docs/ci.md)."""

from __future__ import annotations

from typing import Any

import click

from ..app import App, group, pass_app
from ..errors import CLIError
from .common import complete_names, confirm


def _complete_pool(ctx: click.Context, param: click.Parameter,
                   incomplete: str) -> list[str]:
    return complete_names(ctx, "pool_list", "pools", "pool", incomplete)


def pool_argument(fn: Any) -> Any:
    return click.argument("pool", shell_complete=_complete_pool)(fn)


def _table(pools: list[dict]) -> Any:
    from rich.table import Table
    table = Table(box=None, header_style="bold")
    for col in ("POOL", "TEMPLATE", "SIZE", "READY", "FILLING", "LAST ERROR"):
        table.add_column(col)
    for p in pools:
        table.add_row(p["pool"], p["template"], str(p["size"]), str(p["ready"]),
                      p.get("filling") or "-", p.get("error") or "")
    return table


@group()
def pool() -> None:
    """Warm pools: paused clones of a template, handed over in under a second."""


@pool.command("create")
@pool_argument
@click.option("--template", "-t", required=True, metavar="TEMPLATE",
              help="The template the pool's VMs are clones of.")
@click.option("--size", "-n", type=click.IntRange(1, 64), required=True, metavar="N",
              help="How many clones the agent keeps ready (each counts against the "
                   "host's capacity).")
@pass_app
def create(app: App, pool: str, template: str, size: int) -> None:
    """Keep N clones of TEMPLATE restored and paused (refilled after every take)."""
    doc = app.call("pool_create", pool=pool, template=template, size=size)
    app.out.emit(doc, f"pool [bold]{pool}[/]: {size} clone(s) of template {template} "
                      f"(being made; 'vmctl pool list'); take one with 'vmctl create NAME "
                      f"--pool {pool}' or 'vmctl run --pool {pool} -- COMMAND'", quiet=pool)


@pool.command("list")
@pass_app
def list_(app: App) -> None:
    """The warm pools: template, size, ready clones, the last fill error."""
    doc = app.call("pool_list")
    pools = doc.get("pools") or []
    app.out.emit(doc, _table(pools) if pools else "no pools",
                 quiet="\n".join(p["pool"] for p in pools))


@pool.command("show")
@pool_argument
@pass_app
def show(app: App, pool: str) -> None:
    """One warm pool, with its members."""
    doc = app.call("pool_show", pool=pool)
    lines = [f"pool {doc['pool']}: template {doc['template']}, size {doc['size']}, "
             f"{doc['ready']} ready, owner {doc.get('owner')}",
             f"members: {', '.join(doc.get('members') or []) or '-'}"]
    if doc.get("filling"):
        lines.append(f"filling: {doc['filling']}")
    if doc.get("error"):
        lines.append(f"last error: {doc['error']}")
    app.out.emit(doc, "\n".join(lines), quiet=str(doc["ready"]))


@pool.command("rm")
@pool_argument
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@pass_app
def rm(app: App, pool: str, yes: bool) -> None:
    """Remove a pool and delete its clones (VMs taken from it stay)."""
    if not pool:
        raise CLIError("give a pool name", "bad_request")
    confirm(f"Remove pool {pool!r} and delete its clones?", yes)
    doc = app.call("pool_remove", pool=pool)
    app.out.emit(doc, f"removed pool {pool} ({len(doc.get('deleted') or [])} clone(s) "
                      "deleted)", quiet=pool)


COMMANDS = (pool,)
