"""The ``vmctl`` command group: the commands, ``--version``, error handling.

The shared context and the global options are in :mod:`vmctl.app`; each command module
of :mod:`vmctl.commands` holds module-level click commands (its ``COMMANDS``), named in
:data:`COMMANDS` here and imported only when a command line names one of them (or
``--help`` lists them all): ``vmctl --version`` imports no command module, ``vmctl list``
only :mod:`vmctl.commands.vm`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

import click

from . import __version__
from .app import App, Group
from .errors import CLIError

# Each command's module in vmctl.commands (tests/test_cli_structure.py checks this
# against the modules' COMMANDS); in the order of `vmctl --help`.
COMMANDS: dict[str, str] = {
    "create": "create",
    **dict.fromkeys(("list", "show", "start", "stop", "reboot", "reset", "poweroff",
                     "hard-reset", "delete", "push-config", "snapshot", "snapshots",
                     "wait"), "vm"),
    "events": "events",
    "ssh": "ssh", "ssh-config": "ssh", "proxy": "ssh",
    "console": "console",
    "vnc": "browser", "ui": "browser",
    "image": "image", "host": "host", "template": "template", "pool": "pool",
    "run": "run", "key": "key", "completion": "completion",
}


def _json_asked(argv: list[str], exc: click.ClickException) -> bool:
    """Whether ``--json`` was given: the App knows once its command line was parsed;
    a command line that failed to parse is searched (up to ``--``, which starts an
    ssh command)."""
    ctx = getattr(exc, "ctx", None)
    app = ctx.find_object(App) if ctx is not None else None
    if app is not None and app.json:
        return True
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def _internal(exc: Exception) -> CLIError:
    return CLIError(f"internal error: {exc.__class__.__name__}: {exc} "
                    "(set VMCTL_DEBUG=1 for a traceback)", "internal")


class VmctlGroup(Group):
    """Under ``--json`` every failure prints one JSON document (usage errors, agent
    errors, vmctl's own, internal errors); unexpected failures are one line."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(argv, prog_name, complete_var, False, **extra)
        except click.exceptions.UsageError as exc:
            if _json_asked(argv, exc):
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

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            module = importlib.import_module(f"vmctl.commands.{COMMANDS[name]}")
            for command in module.COMMANDS:
                self.commands.setdefault(command.name, command)
        return self.commands.get(name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.ClickException, click.Abort,
                    KeyboardInterrupt):
                raise
            except Exception as exc:   # a bug: one line, unless VMCTL_DEBUG asks for more
                if os.environ.get("VMCTL_DEBUG"):
                    raise
                raise _internal(exc) from None
        except CLIError as exc:        # vmctl's, the agent's, or the internal one above
            app = ctx.find_object(App)
            if app is not None and app.json:
                app.out.json(exc.to_json())
            raise
        except KeyboardInterrupt:
            click.echo("vmctl: interrupted", err=True)
            ctx.exit(130)
        finally:
            app = ctx.find_object(App)
            if app is not None:
                app.close()


@click.group(cls=VmctlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="vmctl",
                      message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Create and manage QEMU development VMs through vmagent.

    --host/-H, --json and --quiet/-q go before or after any command
    (vmctl --json list, vmctl list --json).

    \b
    Exit codes: 0 ok, 1 error, 2 usage / invalid input, 3 not found,
    4 conflict or wrong state, 5 timeout, 6 agent unreachable, 7 qemu failure,
    8 unauthorized or forbidden.
    """
    ctx.ensure_object(App)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="vmctl")


if __name__ == "__main__":
    main(sys.argv[1:])
