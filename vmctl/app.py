"""What every vmctl command shares: the :class:`App` (options, config, agent client,
output), ``pass_app``, and the global options.

The global options ``--host/-H``, ``--json`` and ``--quiet/-q`` are accepted on the
``vmctl`` group *and* on every command and subcommand, so ``vmctl --json list``,
``vmctl list --json`` and ``vmctl image list -H lab --json`` mean the same. The rule
when one is given more than once (docs/cli.md):

- ``--json`` and ``--quiet`` are switches: on if given anywhere, given twice is once;
- ``--host`` names one agent: the same value may be repeated, two different values
  are a usage error (exit 2), wherever each was given.

Commands are made with :func:`command` and :func:`group` (or inside a :class:`Group`,
whose subcommands get the options too). Nothing heavy is imported here: the config,
the agent client (http.client) and rich are loaded when a command first uses them.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Callable

import click

from .output import Output

if TYPE_CHECKING:                      # pragma: no cover
    from . import address, config as config_mod
    from .client import AgentClient

HOST_HELP = ("Agent to use: a [hosts.NAME] of the config file or an address "
             "(unix:///path, http://host:port, ssh://user@host). Default: $VMCTL_AGENT, "
             "then the config's default_host, then the local agent.")


class App:
    """What every command shares: options, config, the agent client, output."""

    def __init__(self, host: str | None = None, json_mode: bool = False,
                 quiet: bool = False) -> None:
        self.host = host
        self.local = False                  # --local: the per-user agent
        self.out = Output(json_mode=json_mode, quiet=quiet)
        self._config: config_mod.Config | None = None
        self._client: AgentClient | None = None

    @property
    def json(self) -> bool:
        return self.out.json_mode

    @property
    def quiet(self) -> bool:
        return self.out.quiet

    def set_host(self, value: str) -> None:
        if self.host is not None and value != self.host:
            raise click.UsageError(f"--host given twice with different values "
                                   f"({self.host!r} and {value!r}): give one agent")
        self.host = value

    @property
    def config(self) -> config_mod.Config:
        if self._config is None:
            from . import config as config_mod
            self._config = config_mod.load()
        return self._config

    @property
    def target(self) -> address.Target:
        return self.client.target

    @property
    def client(self) -> AgentClient:
        if self._client is None:
            from .client import AgentClient
            self._client = AgentClient(self._resolve())
        return self._client

    def _resolve(self) -> address.Target:
        """The agent to use: --host / VMCTL_AGENT / the config / the system socket;
        --local (or, for a user who is not root and finds no system agent, the offer
        of) the per-user agent (vmctl/localagent.py)."""
        from . import address, localagent
        if self.local:
            if self.host:
                raise click.UsageError("--local and --host: give one agent")
            p = localagent.paths()
            localagent.ensure(p, self.out.info)
            return address.local_target(str(p.socket))
        target = address.resolve(self.host, self.config)
        if (target.source == "default" and not os.path.exists(address.DEFAULT_SOCKET)
                and localagent.offer(address.DEFAULT_SOCKET, localagent.paths(),
                                     sys.stdin.isatty() and not self.json, self.out.info,
                                     lambda q: click.confirm(q, default=True, err=True))):
            return address.local_target(str(localagent.paths().socket))
        return target

    def call(self, op: str, **params: Any) -> dict:
        name = params.get("name")
        if self._client is None and isinstance(name, str) and op != "create":
            self.for_vm(name, op)
        return self.client.call(op, **params)

    def use(self, target: address.Target) -> None:
        """Talk to ``target`` from now on (placement chose it, or a VM is there)."""
        from .client import AgentClient
        self.close()
        self._client = AgentClient(target)

    def for_vm(self, name: str, op: str = "status") -> None:
        """With several hosts and none pinned (vmctl/placement.py): talk to the host
        that has VM ``name``, for an operation on that VM."""
        from vmagent import ops
        row = ops.get(op)
        if row.target != "vm" or "name" not in row.path_params:
            return
        from . import placement
        if placement.fleet(self) is not None:
            target = placement.locate(self, name)
            if target is not None:
                self.use(target)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


pass_app = click.make_pass_decorator(App)


# --- the global options, on every command ---------------------------------------------

def _host_callback(ctx: click.Context, param: click.Parameter, values: Any) -> None:
    app = ctx.ensure_object(App)
    for value in values or ():
        app.set_host(value)


def _switch(attr: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        app = ctx.ensure_object(App)
        if value:
            setattr(app.out, attr, True)
    return callback


def _local(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value:
        ctx.ensure_object(App).local = True


def global_options() -> list[click.Option]:
    """New Option objects (one set per command): their values go to the App."""
    return [
        click.Option(["--host", "-H"], metavar="HOST", multiple=True, expose_value=False,
                     callback=_host_callback, help=HOST_HELP),
        click.Option(["--json"], is_flag=True, expose_value=False,
                     callback=_switch("json_mode"),
                     help="Print one JSON document on stdout (errors too)."),
        click.Option(["--quiet", "-q"], is_flag=True, expose_value=False,
                     callback=_switch("quiet"),
                     help="Print only what a script needs; no progress display."),
        click.Option(["--local"], is_flag=True, expose_value=False, callback=_local,
                     help="Use your own per-user agent (started if it does not run)."),
    ]


class Command(click.Command):
    """A command that also takes the global options (after its own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(global_options())


class Group(click.Group):
    """A group whose own options and every subcommand's include the global ones."""

    command_class = Command
    group_class = type            # subgroups are Groups too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(global_options())


def command(name: str | None = None, **kwargs: Any) -> Callable[[Callable], Command]:
    """``@command("list")``: a module-level command with the global options."""
    kwargs.setdefault("cls", Command)
    return click.command(name, **kwargs)


def group(name: str | None = None, **kwargs: Any) -> Callable[[Callable], Group]:
    kwargs.setdefault("cls", Group)
    return click.group(name, **kwargs)
