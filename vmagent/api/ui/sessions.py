"""Browser sessions of the web UI and their CSRF tokens.

A session is made by a sign-in (a bearer token typed into the sign-in form, or a
single-use link from ``vmctl ui`` / ``vmctl vnc``) and lives in the agent's memory: its
id travels in the ``vmagent_session`` cookie (HttpOnly, SameSite=Strict, Path=/ui,
Secure when the listener has TLS), never in a URL. Each session has a random CSRF token
that every state-changing request must send back (a form field ``csrf`` or the header
``X-CSRF-Token``). A session ends at sign-out, after ``IDLE`` seconds without a request,
``MAX_AGE`` seconds after sign-in, when the token it was made with is revoked, or when
the agent restarts.

A session made by a ``vmctl vnc NAME`` link is *scoped*: it opens the noVNC console of
that one VM and nothing else.
"""

from __future__ import annotations

import base64
import hmac
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from vmagent.context import Caller

COOKIE = "vmagent_session"
CSRF_COOKIE = "vmagent_csrf"     # the sign-in form's CSRF token, before a session exists
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
IDLE = 12 * 3600.0
MAX_AGE = 24 * 3600.0
MAX_SESSIONS = 10000


def random_token() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens (False when either is missing)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


@dataclass
class Session:
    id: str
    caller: Caller
    created: float
    seen: float
    csrf: str = field(default_factory=random_token)
    vnc_only: str | None = None      # a VM name: the session opens its console only

    def allows(self, vm: str | None, vnc: bool) -> bool:
        """Whether this session may open a page: everything, or (scoped) the VNC
        console of its VM."""
        return self.vnc_only is None or (vnc and vm == self.vnc_only)


class SessionStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic, idle: float = IDLE,
                 max_age: float = MAX_AGE) -> None:
        self.clock = clock
        self.idle = idle
        self.max_age = max_age
        self._sessions: dict[str, Session] = {}

    def create(self, caller: Caller, vnc_only: str | None = None) -> Session:
        self._purge()
        if len(self._sessions) >= MAX_SESSIONS:        # the oldest goes
            oldest = min(self._sessions.values(), key=lambda s: s.seen)
            del self._sessions[oldest.id]
        now = self.clock()
        session = Session(random_token(), caller, now, now, vnc_only=vnc_only)
        self._sessions[session.id] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id (its idle time restarts), or None."""
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        now = self.clock()
        if now - session.seen > self.idle or now - session.created > self.max_age:
            del self._sessions[sid]
            return None
        session.seen = now
        return session

    def drop(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)

    def drop_caller(self, predicate: Callable[[Caller], bool]) -> int:
        gone = [s.id for s in self._sessions.values() if predicate(s.caller)]
        for sid in gone:
            del self._sessions[sid]
        return len(gone)

    def _purge(self) -> None:
        now = self.clock()
        for sid in [s.id for s in self._sessions.values()
                    if now - s.seen > self.idle or now - s.created > self.max_age]:
            del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)
