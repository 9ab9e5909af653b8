"""Who is calling, per transport: the :class:`~vmagent.context.RequestContext` of a
request.

* the unix socket: the local user of the connecting process (``SO_PEERCRED``), an
  operator if it is root, a member of the operators group (``vmagent-admin`` by
  default), or the user the agent itself runs as (a per-user agent, ``vmctl --local``). The SSH transport reaches this socket through sshd, as the SSH login user,
  so that user is the caller.
* TCP: the user a bearer token is bound to (``Authorization: Bearer <token>``; the
  scheme is case-insensitive), with the token's role; ``--token-file`` is one operator
  token. A request without a valid token is refused with 401.
"""

from __future__ import annotations

import grp
import hmac
import os
import pwd
import socket
import struct
from typing import Protocol

from aiohttp import web

from vmagent.api.tokens import TokenStore
from vmagent.context import Caller, RequestContext, Role, Transport
from vmagent.errors import Unauthorized

OPERATORS_GROUP = "vmagent-admin"


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


def in_group(user: str, group: str) -> bool:
    try:
        gid = grp.getgrnam(group).gr_gid
        pw = pwd.getpwnam(user)
    except KeyError:
        return False
    return gid in os.getgrouplist(user, pw.pw_gid)


class UnixPeer:
    """Callers on the unix socket, by the uid of the connecting process."""

    def __init__(self, operators_group: str = OPERATORS_GROUP) -> None:
        self.operators_group = operators_group

    def caller(self, uid: int | None) -> Caller:
        if uid is None:
            raise Unauthorized("the caller's identity is unknown (no peer credentials)")
        user = user_name(uid)
        # root, the operators group, and the user a per-user agent runs as
        operator = uid in (0, os.geteuid()) or in_group(user, self.operators_group)
        return Caller(user, Role.OPERATOR if operator else Role.USER, uid=uid)

    def authenticate(self, request: web.Request) -> RequestContext:
        return RequestContext(self.caller(peer_uid(request)), Transport.UNIX)


def bearer_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class BearerTokens:
    """TCP callers: the tokens of the token store, and the ``--token-file`` token (one
    operator, named ``operator``)."""

    def __init__(self, store: TokenStore, static_token: str | None = None) -> None:
        self.store = store
        self._static = static_token.encode() if static_token else None

    def caller_of(self, token: str) -> Caller | None:
        """The caller a token stands for (None: no such token). The web UI's sign-in
        uses it too."""
        if self._static is not None and hmac.compare_digest(token.encode(), self._static):
            return Caller("operator", Role.OPERATOR, token_id="token-file")
        rec = self.store.lookup(token)
        if rec is not None:
            return Caller(rec.user, Role(rec.role), token_id=rec.id)
        return None

    def still_valid(self, caller: Caller) -> bool:
        """Whether the token a caller signed in with still counts (not revoked)."""
        if caller.token_id is None or caller.token_id == "token-file":
            return True
        return self.store.active(caller.token_id)

    def authenticate(self, request: web.Request) -> RequestContext:
        given = bearer_token(request)
        caller = self.caller_of(given) if given is not None else None
        if caller is not None:
            return RequestContext(caller, Transport.TCP)
        raise Unauthorized("a valid bearer token is required "
                           "(Authorization: Bearer <token>)")
