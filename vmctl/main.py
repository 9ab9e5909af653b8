"""The ``vmctl`` command group: global options, the shared context, error handling."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from . import __version__, address, config as config_mod
from .client import AgentClient
from .errors import CLIError
from .output import Output


class App:
    """What every command shares: options, config, the agent client, output."""

    def __init__(self, host: str | None, json_mode: bool, quiet: bool) -> None:
        self.host = host
        self.out = Output(json_mode=json_mode, quiet=quiet)
        self._config: config_mod.Config | None = None
        self._client: AgentClient | None = None

    @property
    def json(self) -> bool:
        return self.out.json_mode

    @property
    def quiet(self) -> bool:
        return self.out.quiet

    @property
    def config(self) -> config_mod.Config:
        if self._config is None:
            self._config = config_mod.load()
        return self._config

    @property
    def target(self) -> address.Target:
        return self.client.target

    @property
    def client(self) -> AgentClient:
        if self._client is None:
            self._client = AgentClient(address.resolve(self.host, self.config))
        return self._client

    def call(self, op: str, **params: Any) -> dict:
        return self.client.call(op, **params)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_app = click.make_pass_decorator(App)


class VmctlGroup(click.Group):
    """Prints ``--json`` error documents and turns unexpected failures into one line."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """Like click's, but a usage error under ``--json`` also prints a JSON document."""
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(argv, prog_name, complete_var, False, **extra)
        except click.exceptions.UsageError as exc:
            if "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv:
                click.echo(json.dumps({"error": "usage", "message": exc.format_message(),
                                       "exit_code": exc.exit_code}, indent=2,
                                      sort_keys=True))
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CLIError as exc:
            app = ctx.find_object(App)
            if app is not None and app.json:
                app.out.json(exc.to_json())
            raise
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("vmctl: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:   # a bug: one line, unless VMCTL_DEBUG asks for more
            if os.environ.get("VMCTL_DEBUG"):
                raise
            raise CLIError(f"internal error: {exc.__class__.__name__}: {exc} "
                           "(set VMCTL_DEBUG=1 for a traceback)", "internal") from None
        finally:
            app = ctx.find_object(App)
            if app is not None:
                app.close()


@click.group(cls=VmctlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", "-H", metavar="HOST", envvar=None,
              help="Agent to use: a [hosts.NAME] of the config file or an address "
                   "(unix:///path, http://host:port, ssh://user@host). Default: "
                   "$VMCTL_AGENT, then the config's default_host, then the local agent.")
@click.option("--json", "json_mode", is_flag=True,
              help="Print one JSON document on stdout (errors too).")
@click.option("--quiet", "-q", is_flag=True, help="Print only what a script needs.")
@click.version_option(__version__, "--version", "-V", prog_name="vmctl",
                      message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, host: str | None, json_mode: bool, quiet: bool) -> None:
    """Create and manage QEMU development VMs through vmagent.

    \b
    Exit codes: 0 ok, 1 error, 2 usage / invalid input, 3 not found,
    4 conflict or wrong state, 5 timeout, 6 agent unreachable, 7 qemu failure,
    8 unauthorized.
    """
    ctx.obj = App(host, json_mode, quiet)


def _register() -> None:
    from .commands import completion, console, host, image, ssh, vm, create
    from .commands import template
    for module in (create, vm, ssh, console, image, host, completion, template):
        module.register(cli)


_register()


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="vmctl")


if __name__ == "__main__":
    main(sys.argv[1:])
