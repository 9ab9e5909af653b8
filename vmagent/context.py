"""Who is calling: the context every operation handler receives.

The server makes one :class:`RequestContext` per request (or per websocket) from the
transport it came in on; handlers read the caller from it (the owner of a new VM, the
user an audit line names) and the permission check (``vmagent/api/``) decides from it.
Nothing here depends on the agent's implementation.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field


class Role(str, enum.Enum):
    OPERATOR = "operator"     # may do everything
    USER = "user"             # may create VMs and operate those they own or administer
    METRICS = "metrics"       # may read the metrics (a Prometheus or Golovan scraper), no more


class Transport(str, enum.Enum):
    UNIX = "unix"             # the agent's unix socket (local users, the SSH transport)
    TCP = "tcp"               # HTTP on a TCP listener (bearer tokens)
    WEB = "web"               # the web UI on the TCP listener (a browser's session)
    INTERNAL = "internal"     # the agent itself (the monitor, a pool refill, tests)


@dataclass(frozen=True)
class Caller:
    user: str
    role: Role
    uid: int | None = None          # a local caller's uid (unix socket)
    token_id: str | None = None     # the bearer token that identified a TCP caller

    @property
    def is_operator(self) -> bool:
        return self.role == Role.OPERATOR

    def to_json(self) -> dict:
        return {"user": self.user, "role": self.role.value}


@dataclass(frozen=True)
class RequestContext:
    caller: Caller
    transport: Transport
    request_id: str = field(default_factory=lambda: os.urandom(6).hex())
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def internal(cls, user: str = "vmagent") -> "RequestContext":
        """The agent acting on its own (the monitor restarting a VM, a test)."""
        return cls(Caller(user, Role.OPERATOR), Transport.INTERNAL)
