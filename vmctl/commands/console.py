"""``vmctl console``: the VM's serial console in the terminal (detach with Ctrl-])."""

from __future__ import annotations

import sys
import time

import click

from ..app import App, command, pass_app
from ..errors import CLIError
from .common import name_argument, vm_name


def _print_log(app: App, name: str, tail: int | None, follow: bool) -> None:
    params = {"name": name, "tail": tail} if tail is not None else {"name": name, "offset": 0}
    doc = app.call("console_log", **params)
    if app.json:
        app.out.json(doc)
        return
    click.echo(doc.get("data", ""), nl=False)
    offset = doc.get("offset", 0)
    while follow:
        time.sleep(0.5)
        doc = app.call("console_log", name=name, offset=offset)
        offset = doc.get("offset", offset)
        if doc.get("data"):
            click.echo(doc["data"], nl=False)


@command()
@name_argument
@click.option("--log", "show_log", is_flag=True,
              help="Print the console log instead of attaching.")
@click.option("--tail", type=click.IntRange(0), metavar="BYTES",
              help="With --log: only the last BYTES of it.")
@click.option("--follow", "-f", is_flag=True, help="With --log: keep printing.")
@pass_app
def console(app: App, name: str, show_log: bool, tail: int | None, follow: bool) -> None:
    """Attach the terminal to a VM's serial console; detach with Ctrl-].

    Press Enter to get a login prompt.
    """
    name = vm_name(name)
    if show_log:
        _print_log(app, name, tail, follow)
        return
    if app.json:
        raise click.UsageError("--json works with 'vmctl console --log' only")
    status = app.call("status", name=name)
    if status.get("state") != "running":
        raise CLIError(f"VM {name!r} is {status.get('state')}; its log: "
                       f"'vmctl console {name} --log'", "conflict")
    import asyncio                    # late: the websocket bridge (aiohttp) only here
    from ..streams import DETACH, bridge, raw_terminal, real_fd
    in_fd, out_fd = real_fd(sys.stdin, 0), real_fd(sys.stdout, 1)
    if in_fd is None or out_fd is None:
        raise CLIError("console needs a terminal (or real stdin/stdout)", "bad_request")
    app.out.info(f"Connected to the console of {name}; detach with Ctrl-]")
    with raw_terminal(in_fd):
        reason = asyncio.run(bridge(app.client, "console", name, in_fd=in_fd,
                                    out_fd=out_fd, detach_key=DETACH, linger=1.0))
    app.out.info("\r\ndetached" if reason == "detached" else "\r\nconsole closed")


COMMANDS = (console,)
