"""``vmctl completion bash|zsh|fish``: shell completion scripts (click's machinery).

The generated scripts are committed in ``completions/``; ``python -m
vmctl.gen_completions`` rewrites them and a test checks they are current.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..app import command

SHELLS = ("bash", "zsh", "fish")
FILES = {"bash": "vmctl.bash", "zsh": "_vmctl", "fish": "vmctl.fish"}
COMPLETE_VAR = "_VMCTL_COMPLETE"


def script(cli: click.Command, shell: str) -> str:
    from click.shell_completion import get_completion_class   # late: only for this
    cls = get_completion_class(shell)
    if cls is None:
        raise click.UsageError(f"unsupported shell {shell!r}")
    return cls(cli, {}, "vmctl", COMPLETE_VAR).source().rstrip("\n") + "\n"


@command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    bash: vmctl completion bash > ~/.local/share/bash-completion/completions/vmctl
    zsh:  vmctl completion zsh > "${fpath[1]}/_vmctl"
    fish: vmctl completion fish > ~/.config/fish/completions/vmctl.fish
    """
    click.echo(script(ctx.find_root().command, shell), nl=False)


COMMANDS = (completion,)


def write_all(cli: click.Command, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for shell, fname in FILES.items():
        (directory / fname).write_text(script(cli, shell))

