"""Who is calling, per transport: the :class:`~vmagent.context.RequestContext` of a
request.

* the unix socket: the local user of the connecting process (``SO_PEERCRED``);
* TCP: the holder of a bearer token (``Authorization: Bearer <token>``; the scheme is
  case-insensitive); a request without a valid one is refused with 401.
"""

from __future__ import annotations

import hmac
import pwd
import socket
import struct
from typing import Protocol

from aiohttp import web

from vmagent.context import Caller, RequestContext, Role, Transport
from vmagent.errors import Unauthorized


class Authenticator(Protocol):
    def authenticate(self, request: web.Request) -> RequestContext: ...


def peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


class UnixPeer:
    """Callers on the unix socket: whoever the socket's mode lets in is trusted as an
    operator (who may connect is decided by the socket's owner, group and mode)."""

    def authenticate(self, request: web.Request) -> RequestContext:
        uid = peer_uid(request)
        user = user_name(uid) if uid is not None else "unknown"
        return RequestContext(Caller(user, Role.OPERATOR, uid=uid), Transport.UNIX)


def bearer_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class StaticToken:
    """One operator token (``--token-file``)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def authenticate(self, request: web.Request) -> RequestContext:
        given = bearer_token(request)
        if given is None or not hmac.compare_digest(given.encode(), self._token):
            raise Unauthorized("a valid bearer token is required "
                               "(Authorization: Bearer <token>)")
        return RequestContext(Caller("operator", Role.OPERATOR, token_id="token-file"),
                              Transport.TCP)
