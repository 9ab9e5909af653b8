"""``vmctl vnc NAME`` and ``vmctl ui``: links that open a VM's screen (noVNC) or the web
UI in a browser. Each link is short-lived and works once; the agent makes it for the
caller (over whatever transport vmctl uses), so no token is handed to the browser."""

from __future__ import annotations

import click

from ..app import App, command, pass_app
from ..errors import CLIError
from .common import name_argument, vm_name

TTL_HELP = "Seconds the link stays valid (default 120, at most 600)."


def _open(app: App, url: str) -> None:
    import webbrowser           # late: only --open needs it
    try:
        opened = webbrowser.open(url)
    except Exception:           # noqa: BLE001 - any failure of the browser is the same
        opened = False
    if not opened:
        raise CLIError("could not open a browser here; open the link above yourself "
                       "(it works once)", "internal")


def _emit(app: App, doc: dict, what: str, open_it: bool) -> None:
    url = doc["url"]
    app.out.emit(doc, lambda: click.echo(url), quiet=url)
    if not app.json:
        app.out.info(f"{what}; the link works once, within {doc['expires_in']:g} s")
    if open_it:
        _open(app, url)


@command()
@name_argument
@click.option("--open", "open_it", is_flag=True, help="Open the link in a browser.")
@click.option("--ttl", type=click.FloatRange(1, 600), metavar="SECONDS", help=TTL_HELP)
@pass_app
def vnc(app: App, name: str, open_it: bool, ttl: float | None) -> None:
    """Print a link to the VM's screen (noVNC) in a browser.

    The link opens this VM's console only, once, for a short time: it can be pasted
    into a browser on another machine without handing out your token.
    """
    name = vm_name(name)
    doc = app.call("vnc_link", name=name, **({"ttl": ttl} if ttl is not None else {}))
    _emit(app, doc, f"the screen of {name} for {doc.get('user')}", open_it)


@command()
@click.option("--open", "open_it", is_flag=True, help="Open the link in a browser.")
@click.option("--ttl", type=click.FloatRange(1, 600), metavar="SECONDS", help=TTL_HELP)
@pass_app
def ui(app: App, open_it: bool, ttl: float | None) -> None:
    """Print a link that signs a browser in to the agent's web UI as you."""
    doc = app.call("ui_link", **({"ttl": ttl} if ttl is not None else {}))
    _emit(app, doc, f"the web UI, signed in as {doc.get('user')}", open_it)


COMMANDS = (vnc, ui)
