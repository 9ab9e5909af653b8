"""``vmctl key add | list | rm``: your SSH public keys in the agent's key registry, the
ones that get into the VMs you own or administer (docs/access.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..app import App, group, pass_app
from ..errors import CLIError

USER_OPTION = click.option("--user", "-u", metavar="NAME",
                           help="Another person's keys (operators only).")


def _table(keys: list[dict]) -> Any:
    from rich.table import Table
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("TYPE", "FINGERPRINT", "COMMENT", "SOURCE"):
        table.add_column(col)
    for k in keys:
        table.add_row(k["type"], k["fingerprint"], k.get("comment") or "", k["source"])
    return table


@group()
def key() -> None:
    """Your SSH public keys, the ones your VMs get."""


@key.command("add")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@USER_OPTION
@pass_app
def add(app: App, files: tuple[str, ...], user: str | None) -> None:
    """Add the public keys in FILE (a .pub or authorized_keys file; '-' reads stdin)."""
    text = []
    for f in files:
        try:
            text.append(click.get_text_stream("stdin").read() if f == "-" else
                        Path(f).expanduser().read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(f"{f}: {getattr(exc, 'strerror', None) or exc}",
                           "bad_request") from None
    doc = app.call("key_add", user=user, keys="\n".join(text))
    added = doc.get("added") or []
    app.out.emit(doc, f"{doc.get('user')}: {len(added)} key(s) added, "
                      f"{len(doc.get('keys') or [])} in all",
                 quiet="\n".join(k["fingerprint"] for k in added) or None)


@key.command("list")
@USER_OPTION
@pass_app
def list_(app: App, user: str | None) -> None:
    """The keys a new VM of yours would get, and where they come from."""
    doc = app.call("key_list", user=user)
    keys = doc.get("keys") or []
    if doc.get("warning"):
        app.out.info(f"warning: {doc['warning']}")
    human: Any = (lambda: app.out.console.print(_table(keys))) if keys else (
        f"{doc.get('user')} has no SSH keys: add one with 'vmctl key add "
        "~/.ssh/id_ed25519.pub'")
    app.out.emit(doc, human, quiet="\n".join(k["key"] for k in keys) or None)


@key.command("rm")
@click.argument("which", metavar="FINGERPRINT|COMMENT")
@USER_OPTION
@pass_app
def rm(app: App, which: str, user: str | None) -> None:
    """Remove a key from the keys directory (by fingerprint, comment or the key)."""
    doc = app.call("key_remove", user=user, key=which)
    gone = doc.get("removed") or []
    app.out.emit(doc, f"{doc.get('user')}: removed {len(gone)} key(s)",
                 quiet="\n".join(k["fingerprint"] for k in gone) or None)


COMMANDS = (key,)
