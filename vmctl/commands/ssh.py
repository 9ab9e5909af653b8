"""``vmctl ssh``, ``vmctl ssh-config`` and the hidden ``vmctl proxy`` (ProxyCommand).

``vmctl ssh NAME [COMMAND...]`` reads its own options (``-t``, ``--print``, the global
``-H``/``--json``/``-q``) before ``--``, or, without ``--``, up to the first word after
NAME that is none of them: that word starts COMMAND, and nothing from there on is read
by vmctl (``vmctl ssh dev1 grep -q x f`` runs ``grep -q x f``). An unknown option
before a ``--`` is an error, not the start of COMMAND.
"""

from __future__ import annotations

import os
import sys

import click

from ..app import App, Command, command, pass_app
from ..errors import CLIError
from .common import name_argument, vm_name


def _running(app: App, name: str) -> dict:
    status = app.call("status", name=vm_name(name))
    if status.get("state") != "running":
        raise CLIError(f"VM {name!r} is {status.get('state')}; start it with "
                       f"'vmctl start {name}'", "conflict")
    if not status.get("ssh_port"):
        raise CLIError(f"VM {name!r} has no SSH port", "conflict")
    return status


def command_start(cmd: click.Command, ctx: click.Context, args: list[str]) -> int | None:
    """Where COMMAND starts in ``args``: the index of a ``--`` before it (which vmctl
    drops), or of the first word after NAME that is not an option of ``cmd``, or None."""
    takes_value = {}
    for p in cmd.get_params(ctx):
        if isinstance(p, click.Option):
            for opt in (*p.opts, *p.secondary_opts):
                takes_value[opt] = not p.is_flag and not p.count
    seen_name, i = False, 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return i
        key = word.split("=", 1)[0]
        if word.startswith("--") and key in takes_value:
            i += 2 if takes_value[key] and "=" not in word else 1   # --host h1, --host=h1
            continue
        if word.startswith("-") and len(word) > 1 and word[:2] in takes_value:
            short = word[:2]
            if takes_value[short]:                    # -H h1, -Hh1
                i += 1 if len(word) > 2 else 2
                continue
            if all(f"-{c}" in takes_value and not takes_value[f"-{c}"] for c in word[1:]):
                i += 1                                # -t, -qt
                continue
        if seen_name:
            if word.startswith("-") and "--" in args[i:]:
                return args.index("--", i)            # meant as ours: click refuses it
            return i                                  # a command word, or its option
        if word.startswith("-") and len(word) > 1:
            i += 1                                    # unknown before NAME: click says so
            continue
        seen_name, i = True, i + 1
    return None


class SshCommand(Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        cut = command_start(self, ctx, args)
        if cut is not None and args[cut] != "--":
            args.insert(cut, "--")
        ctx.allow_interspersed_args = True
        return super().parse_args(ctx, args)


def _ssh_failure(name: str, log: str) -> CLIError:
    """Why ssh itself failed (exit 255), from its own messages (``ssh -E``)."""
    from .. import vmssh
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    last = lines[-1] if lines else "no message"
    low = log.lower()
    if "banner exchange" in low or "timed out" in low:
        why = (f"no SSH answer within {vmssh.connect_timeout():g}s (ConnectTimeout): the "
               "guest is hung, overloaded or still booting")
    elif "not responding" in low:
        every, count = vmssh.SERVER_ALIVE_INTERVAL, vmssh.SERVER_ALIVE_COUNT
        why = (f"the VM stopped answering for {every * count}s (ServerAliveInterval "
               f"{every} x ServerAliveCountMax {count})")
    elif "connection refused" in low or "connection closed" in low or \
            "connection reset" in low:
        why = "nothing answers on the VM's SSH port yet (sshd not started, or it restarted)"
    elif "permission denied" in low:
        why = "the VM refused the login: your key is not among the VM's keys"
    elif "host key" in low or "identification has changed" in low:
        why = "the VM's host key is not the one vmctl pinned for it"
    else:
        why = "ssh failed"
    return CLIError(f"ssh to VM {name!r} failed: {why} ({last}); its console: "
                    f"'vmctl console {name} --log'", "ssh_failed", exit_code=255)


def _run_ssh(name: str, argv: list[str]) -> int:
    """Run ssh with its own messages in a file (``-E``), so a failure of ssh itself is
    explained while the remote command's stderr passes through untouched."""
    import shutil
    import subprocess
    import tempfile

    from ..streams import real_fd
    if shutil.which("ssh") is None:
        raise CLIError("the OpenSSH client (ssh) is not installed", "ssh_failed")
    fd, log_path = tempfile.mkstemp(prefix="vmctl-ssh-", suffix=".log")
    os.close(fd)
    try:
        stdout_fd, stdin_fd = real_fd(sys.stdout, 1), real_fd(sys.stdin, 0)
        # under a test runner stdout is not a file: capture and echo instead
        proc = subprocess.run([argv[0], "-E", log_path, *argv[1:]],
                              stdin=stdin_fd if stdin_fd is not None else subprocess.DEVNULL,
                              stdout=None if stdout_fd is not None else subprocess.PIPE,
                              stderr=None if stdout_fd is not None else subprocess.PIPE)
        if stdout_fd is None:
            click.echo(proc.stdout.decode(errors="replace"), nl=False)
            click.echo(proc.stderr.decode(errors="replace"), nl=False, err=True)
        with open(log_path, errors="replace") as f:
            log = f.read()
    finally:
        os.unlink(log_path)
    if proc.returncode == 255 and log.strip():
        raise _ssh_failure(name, log)
    if log.strip():
        click.echo(log, nl=False, err=True)   # ssh's warnings: never hidden
    return proc.returncode


@command(cls=SshCommand)
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
    from .. import vmssh
    status = _running(app, name)
    vmssh.pin_host_keys(app.call, app.target, status)
    argv = vmssh.ssh_argv(app.target, status, app.config, list(command) or None, tty=tty)
    if print_only:
        app.out.emit({"argv": argv}, " ".join(_quote(a) for a in argv),
                     quiet=" ".join(_quote(a) for a in argv))
        return
    if app.json:
        raise click.UsageError("--json is not supported by 'vmctl ssh' (use --print)")
    click.get_current_context().exit(_run_ssh(status["name"], argv))


@command("ssh-config")
@name_argument
@click.option("--alias", metavar="HOST", help="Host alias to use (default: NAME).")
@pass_app
def ssh_config(app: App, name: str, alias: str | None) -> None:
    """Print an OpenSSH config block for a VM (append it to ~/.ssh/config)."""
    from .. import vmssh
    status = app.call("status", name=vm_name(name))
    vmssh.pin_host_keys(app.call, app.target, status)   # the master's socket names them
    block = vmssh.config_block(app.target, status, app.config, alias)
    app.out.emit({"name": name, "config": block,
                  "options": vmssh.ssh_options(app.target, status, app.config)},
                 lambda: click.echo(block, nl=False), quiet=block.rstrip("\n"))


@command(hidden=True)
@name_argument
@pass_app
def proxy(app: App, name: str) -> None:
    """Connect stdin/stdout to the VM's SSH port (for ssh's ProxyCommand)."""
    import asyncio

    from ..streams import bridge, real_fd
    in_fd, out_fd = real_fd(sys.stdin, 0), real_fd(sys.stdout, 1)
    if in_fd is None or out_fd is None:
        raise CLIError("proxy needs real stdin and stdout (it is ssh's ProxyCommand)",
                       "bad_request")
    asyncio.run(bridge(app.client, "tunnel", vm_name(name), in_fd=in_fd, out_fd=out_fd,
                       linger=2.0))


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


COMMANDS = (ssh, ssh_config, proxy)
