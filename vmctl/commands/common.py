"""Helpers shared by the command modules: validation, completion, confirmation, input
files."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from vmagent.errors import VMAgentError
from vmagent.spec import check_image_name, check_name, parse_size

from ..app import App
from ..errors import CLIError

COMPLETION_TIMEOUT = 2.0      # a shell waiting for names: better none than a hang


def checked(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a vmagent validator; its BadRequest becomes a usage error (exit 2)."""
    try:
        return fn(*args)
    except VMAgentError as exc:
        raise CLIError(exc.message, "bad_request") from None


def vm_name(value: str) -> str:
    return checked(check_name, value)


def image_name(value: str) -> str:
    return checked(check_image_name, value)


def size_arg(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    checked(parse_size, value, what)
    return value


def complete_names(ctx: click.Context, op: str, key: str, field: str,
                   incomplete: str) -> list[str]:
    """Names from the agent for shell completion; silent (no names) on any failure."""
    given = ctx.find_object(App)
    app = App(given.host if given is not None else None, quiet=True)
    try:
        app.client.timeout = COMPLETION_TIMEOUT
        doc = app.call(op)
        return sorted(x[field] for x in doc.get(key, []) if x.get(field, "").startswith(
            incomplete))
    except Exception:
        return []
    finally:
        app.close()


def complete_vm(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return complete_names(ctx, "list", "vms", "name", incomplete)


def complete_image(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return complete_names(ctx, "image_list", "images", "name", incomplete)


def name_argument(fn: Callable) -> Callable:
    return click.argument("name", shell_complete=complete_vm)(fn)


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise CLIError(f"{question} Refusing without --yes (not an interactive terminal).",
                       "bad_request")
    if not click.confirm(question, default=False, err=True):
        raise CLIError("cancelled", "conflict", exit_code=1)


def text_file(stream: Any, option: str) -> str | None:
    """The text of a file option opened in binary mode (``click.File("rb")``): UTF-8, or
    a usage error naming the option and the file (exit 2), never a traceback."""
    if stream is None:
        return None
    data = stream.read()
    name = getattr(stream, "name", "-")
    name = "stdin" if name in ("-", "<stdin>") else name
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"{option} {name}: not UTF-8 text (byte {exc.start} is "
                       f"{data[exc.start]:#04x}; is it a binary file?)",
                       "bad_request") from None
