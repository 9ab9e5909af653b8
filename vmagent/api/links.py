"""Short-lived, single-use links that sign a browser in: ``vmctl ui`` (the web UI, as
the caller) and ``vmctl vnc NAME`` (the noVNC console of one VM, nothing else).

A link carries a random token (``vml_`` and 32 random bytes); the agent keeps only
its sha256, with the caller it was made for, what it opens (``ui``, or ``vnc`` and the
VM) and when it expires. Redeeming it once (:meth:`LinkTokens.redeem`) gives back the
caller and marks it used; a second use, an expired link, a link for another VM or for
another purpose are refused with a message that says which. Links live in the agent's
memory: an agent restart invalidates them (they last seconds, so nothing is lost).

The handlers of ``vnc_link`` and ``ui_link`` are :class:`LinkService`'s; the access
guard has already checked that the caller may operate the VM (or asks for themself).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from vmagent.context import Caller, RequestContext
from vmagent.errors import BadRequest, Conflict, NotFound, Unauthorized

PREFIX = "vml_"
DEFAULT_TTL = 120.0           # seconds: enough to paste a link into another machine
MAX_TTL = 600.0
KINDS = ("ui", "vnc")


@dataclass
class Link:
    kind: str                 # ui | vnc
    caller: Caller
    vm: str | None            # vnc: the one VM it opens
    expires: float            # time.monotonic()
    ttl: float
    used: bool = False


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_ttl(value: Any) -> float:
    if value in (None, ""):
        return DEFAULT_TTL
    try:
        ttl = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"ttl: {str(value)[:40]!r} is not a number of seconds") from None
    if isinstance(value, bool) or not 1 <= ttl <= MAX_TTL:
        raise BadRequest(f"ttl: a link lasts from 1 to {MAX_TTL:g} seconds")
    return ttl


class LinkTokens:
    """The links the agent has handed out (by digest), until they expire."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._links: dict[str, Link] = {}

    def issue(self, kind: str, caller: Caller, vm: str | None = None,
              ttl: float = DEFAULT_TTL) -> str:
        if kind not in KINDS:
            raise ValueError(kind)
        if (kind == "vnc") != (vm is not None):
            raise ValueError("a vnc link names its VM; a ui link names none")
        self._purge()
        token = PREFIX + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        self._links[_digest(token)] = Link(kind, caller, vm, self.clock() + ttl, ttl)
        return token

    def redeem(self, token: str, kind: str | None = None, vm: str | None = None) -> Link:
        """The link's record, now used. :class:`Unauthorized` if it is not valid
        (unknown, expired, used) or not for this (``kind``, ``vm``: None, any)."""
        found = None
        if isinstance(token, str) and token.startswith(PREFIX) and len(token) < 100:
            want = _digest(token)
            found = next((link for key, link in self._links.items()
                          if hmac.compare_digest(key, want)), None)
        if found is None:
            raise Unauthorized("this link is not valid (mistyped, or made by an agent that "
                               "has restarted since): make a new one with 'vmctl ui' or "
                               "'vmctl vnc NAME'")
        again = "run 'vmctl ui' again" if found.kind == "ui" else \
            f"run 'vmctl vnc {found.vm}' again"
        if found.used:
            raise Unauthorized(f"this link was already used (a link signs in once): {again}")
        if self.clock() >= found.expires:
            raise Unauthorized(f"this link has expired (it lasted {found.ttl:g} s): {again}")
        if (kind is not None and found.kind != kind) or (vm is not None and found.vm != vm):
            what = f"the console of VM {found.vm}" if found.kind == "vnc" else "the web UI"
            raise Unauthorized(f"this link opens {what}, not this page")
        found.used = True
        return found

    def _purge(self) -> None:
        now = self.clock()
        for key in [k for k, link in self._links.items() if link.expires <= now]:
            del self._links[key]

    def __len__(self) -> int:
        return len(self._links)


class LinkService:
    """The handlers of ``vnc_link`` and ``ui_link``. ``base_url`` is where browsers
    reach the agent's web UI (its TCP listener); None: the agent has none."""

    def __init__(self, tokens: LinkTokens, exists: Callable[[str], bool]) -> None:
        self.tokens = tokens
        self.exists = exists
        self.base_url: str | None = None

    def _base(self) -> str:
        if self.base_url is None:
            raise Conflict("the web UI is served on the agent's TCP listener, and this "
                           "agent has none: start it with --listen HOST:PORT")
        return self.base_url.rstrip("/")

    async def vnc_link(self, ctx: RequestContext, name: str, ttl: Any = None) -> dict:
        seconds = parse_ttl(ttl)
        if not self.exists(name):
            raise NotFound(f"no VM named {name!r}", vm=name)
        base = self._base()
        token = self.tokens.issue("vnc", ctx.caller, name, seconds)
        return {"url": f"{base}/ui/link/{token}", "vm": name, "expires_in": seconds,
                "user": ctx.caller.user}

    async def ui_link(self, ctx: RequestContext, ttl: Any = None) -> dict:
        seconds = parse_ttl(ttl)
        base = self._base()
        token = self.tokens.issue("ui", ctx.caller, None, seconds)
        return {"url": f"{base}/ui/link/{token}", "expires_in": seconds,
                "user": ctx.caller.user}
