"""Errors of the CLI and their exit codes (documented in docs/cli.md).

Every failure the user can cause or meet ends as one :class:`CLIError`: a one-line message
on stderr and an exit code a script can test. Agent error codes (``vmagent/errors.py``)
are mapped to exit codes here, once.
"""

from __future__ import annotations

from typing import Any

import click

OK = 0
GENERIC = 1
USAGE = 2            # click's own code for usage errors; also invalid input the agent refuses
NOT_FOUND = 3
CONFLICT = 4         # wrong state for the operation, name taken, VM busy
TIMEOUT = 5
UNREACHABLE = 6      # no agent answers at the address (or the SSH tunnel failed)
QEMU_FAILED = 7
UNAUTHORIZED = 8

EXIT_CODES = {
    "bad_request": USAGE,
    "too_large": USAGE,
    "image_error": GENERIC,
    "unauthorized": UNAUTHORIZED,
    "forbidden": UNAUTHORIZED,
    "not_found": NOT_FOUND,
    "conflict": CONFLICT,
    "qemu_failed": QEMU_FAILED,
    "qmp_failed": QEMU_FAILED,
    "timeout": TIMEOUT,
    "unavailable": GENERIC,
    "no_space": GENERIC,
    "internal": GENERIC,
    # raised by vmctl itself
    "unreachable": UNREACHABLE,
    "config": GENERIC,
    "ssh_failed": GENERIC,
    "build_failed": GENERIC,
}


def exit_code_for(code: str) -> int:
    return EXIT_CODES.get(code, GENERIC)


class CLIError(click.ClickException):
    """A failure reported as ``vmctl: <message>`` on stderr with ``exit_code``.

    ``code`` is the agent's error code (or one of vmctl's own: ``unreachable``,
    ``config``, ``ssh_failed``); ``--json`` prints it as ``{"error", "message", ...}``.
    """

    def __init__(self, message: str, code: str = "internal", *, details: dict | None = None,
                 status: int | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details or {}
        self.status = status
        self.exit_code = exit_code if exit_code is not None else exit_code_for(code)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"error": self.code, "message": self.message,
                               "exit_code": self.exit_code}
        if self.details:
            doc["details"] = self.details
        return doc

    def show(self, file: Any = None) -> None:
        click.echo(f"vmctl: {self.format_message()}", file=file, err=file is None)


class AgentError(CLIError):
    """The agent answered with an error document: ``{"error", "message", "details"}``."""


class Unreachable(CLIError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "unreachable")


class ConfigError(CLIError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "config")


class WaitTimeout(CLIError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "timeout")
