"""Typed errors of the agent.

Every error the agent reports to a client is a :class:`VMAgentError`. Each class carries
its wire code and HTTP status, so the mapping to HTTP happens once (in ``server.py``) and
the CLI maps the same codes to exit codes once (in ``vmctl/errors.py``).
"""

from __future__ import annotations

import errno
from typing import Any


class VMAgentError(Exception):
    """Base class: ``code`` is the JSON ``error`` field, ``status`` the HTTP status."""

    code = "internal"
    status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(VMAgentError):
    """The caller's input is invalid (400)."""

    code = "bad_request"
    status = 400


class Unauthorized(VMAgentError):
    code = "unauthorized"
    status = 401


class Forbidden(VMAgentError):
    """The caller is known but may not do this (403): not the VM's owner or admin, or
    an operator's operation."""

    code = "forbidden"
    status = 403


class NotFound(VMAgentError):
    code = "not_found"
    status = 404


class PayloadTooLarge(VMAgentError):
    """The request body is over the agent's limit (413)."""

    code = "too_large"
    status = 413


class Conflict(VMAgentError):
    """Wrong state for the operation, the name exists, or the VM's lock is busy (409)."""

    code = "conflict"
    status = 409


class NoSpace(VMAgentError):
    """The state dir's file system is full (507): nothing half-made is left."""

    code = "no_space"
    status = 507


def is_no_space(exc: BaseException) -> bool:
    """An error that means 'the disk is full' (ENOSPC, or a tool that said so)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    output = getattr(exc, "output", None)
    return isinstance(output, str) and "No space left on device" in output


class Timeout(VMAgentError):
    """An operation did not finish within its timeout (504)."""

    code = "timeout"
    status = 504


class Unavailable(VMAgentError):
    """Something the operation needs is unreachable (a key source, a peer) (503)."""

    code = "unavailable"
    status = 503


class VMLaunchFailure(VMAgentError):
    """qemu failed to start: carries its exit code, its argv and what it printed."""

    code = "qemu_failed"
    status = 500

    def __init__(self, exitcode: int | None, command: list[str], output: str,
                 message: str | None = None) -> None:
        self.exitcode = exitcode
        self.command = list(command)
        self.output = output
        text = output.strip().splitlines()
        summary = text[-1] if text else "no output"
        super().__init__(message or f"qemu failed to start (exit code {exitcode}): {summary}",
                         exitcode=exitcode, output=output, command=self.command)


class QMPFailure(VMAgentError):
    """A QMP command failed or the monitor could not be reached."""

    code = "qmp_failed"
    status = 500


class ImageError(VMAgentError):
    """An image could not be fetched, verified or used (it is the input that is wrong)."""

    code = "image_error"
    status = 400


class InternalError(VMAgentError):
    code = "internal"
    status = 500
