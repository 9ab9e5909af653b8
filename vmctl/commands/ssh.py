"""``vmctl ssh``, ``vmctl ssh-config`` and the hidden ``vmctl proxy`` (ProxyCommand)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import click

from .. import vmssh
from ..errors import CLIError
from ..main import App, pass_app
from ..streams import bridge, real_fd
from .common import name_argument, vm_name


def _running(app: App, name: str) -> dict:
    status = app.call("status", name=vm_name(name))
    if status.get("state") != "running":
        raise CLIError(f"VM {name!r} is {status.get('state')}; start it with "
                       f"'vmctl start {name}'", "conflict")
    if not status.get("ssh_port"):
        raise CLIError(f"VM {name!r} has no SSH port", "conflict")
    return status


def register(cli: click.Group) -> None:
    @cli.command(context_settings={"ignore_unknown_options": True,
                                   "allow_interspersed_args": False})
    @name_argument
    @click.option("--tty/--no-tty", "-t/-T", default=None,
                  help="Force (or disable) a pseudo-terminal, like ssh -t/-T.")
    @click.option("--print", "print_only", is_flag=True,
                  help="Print the ssh command line instead of running it.")
    @click.argument("command", nargs=-1, type=click.UNPROCESSED)
    @pass_app
    def ssh(app: App, name: str, tty: bool | None, print_only: bool,
            command: tuple[str, ...]) -> None:
        """Log into a VM, or run COMMAND there (its exit code is passed through).

        \b
        vmctl ssh dev1
        vmctl ssh dev1 -- uname -r
        """
        if command[:1] == ("--",):
            command = command[1:]
        status = _running(app, name)
        vmssh.pin_host_keys(app.call, app.target, status)
        argv = vmssh.ssh_argv(app.target, status, app.config, list(command) or None, tty=tty)
        if print_only:
            app.out.emit({"argv": argv}, " ".join(_quote(a) for a in argv),
                         quiet=" ".join(_quote(a) for a in argv))
            return
        if app.json:
            raise click.UsageError("--json is not supported by 'vmctl ssh' (use --print)")
        if shutil.which("ssh") is None:
            raise CLIError("the OpenSSH client (ssh) is not installed", "ssh_failed")
        stdout_fd = real_fd(sys.stdout, 1)
        stdin_fd = real_fd(sys.stdin, 0)
        # under a test runner stdout is not a file: capture and echo instead
        proc = subprocess.run(argv, stdin=stdin_fd if stdin_fd is not None
                              else subprocess.DEVNULL,
                              stdout=None if stdout_fd is not None else subprocess.PIPE,
                              stderr=None if stdout_fd is not None else subprocess.PIPE)
        if stdout_fd is None:
            click.echo(proc.stdout.decode(errors="replace"), nl=False)
            click.echo(proc.stderr.decode(errors="replace"), nl=False, err=True)
        click.get_current_context().exit(proc.returncode)

    @cli.command("ssh-config")
    @name_argument
    @click.option("--alias", metavar="HOST", help="Host alias to use (default: NAME).")
    @pass_app
    def ssh_config(app: App, name: str, alias: str | None) -> None:
        """Print an OpenSSH config block for a VM (append it to ~/.ssh/config)."""
        status = app.call("status", name=vm_name(name))
        block = vmssh.config_block(app.target, status, app.config, alias)
        app.out.emit({"name": name, "config": block,
                      "options": vmssh.ssh_options(app.target, status, app.config)},
                     lambda: click.echo(block, nl=False), quiet=block.rstrip("\n"))

    @cli.command(hidden=True)
    @name_argument
    @pass_app
    def proxy(app: App, name: str) -> None:
        """Connect stdin/stdout to the VM's SSH port (for ssh's ProxyCommand)."""
        in_fd, out_fd = real_fd(sys.stdin, 0), real_fd(sys.stdout, 1)
        if in_fd is None or out_fd is None:
            raise CLIError("proxy needs real stdin and stdout (it is ssh's ProxyCommand)",
                           "bad_request")
        asyncio.run(bridge(app.client, "tunnel", vm_name(name), in_fd=in_fd, out_fd=out_fd,
                           linger=2.0))


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)
