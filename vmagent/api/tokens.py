"""Bearer tokens for the TCP API, each bound to one user and a role.

``STATE_DIR/tokens.json`` (mode 0600) holds, per token, its id, user, role, creation
time and the sha256 of the token, never the token itself: ``vmagent token add`` prints
it once. A token reads ``vmt_<id>_<secret>`` (32 random bytes): the id finds the
record, the digest is compared in constant time. The agent re-reads the file when it
changes, so tokens added or revoked with ``vmagent token`` count at once.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from vmagent.context import Role
from vmagent.errors import BadRequest, NotFound
from vmagent.fsutil import read_record, write_record
from vmagent.spec import USER_RE

FILE = "tokens.json"
FORMAT = 1
PREFIX = "vmt_"
_TOKEN_RE = re.compile(r"^vmt_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class TokenRecord:
    id: str
    user: str
    role: str
    sha256: str
    created: str

    def public(self) -> dict:
        """What ``token list`` shows (not the digest)."""
        return {"id": self.id, "user": self.user, "role": self.role,
                "created": self.created}


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE
        self._cache: tuple[tuple[int, int], dict[str, TokenRecord]] | None = None

    # --- reading ---------------------------------------------------------------------

    def _records(self) -> dict[str, TokenRecord]:
        """The records by id, re-read when the file changed (by mtime and size)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        key = (st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != key:
            doc = read_record(self.path, FORMAT)
            records = {r["id"]: TokenRecord(**r) for r in doc.get("tokens", [])}
            self._cache = (key, records)
        return self._cache[1]

    def list(self) -> list[TokenRecord]:
        return sorted(self._records().values(), key=lambda r: (r.user, r.created, r.id))

    def lookup(self, token: str) -> TokenRecord | None:
        m = _TOKEN_RE.match(token)
        if not m:
            return None
        rec = self._records().get(m.group(1))
        if rec is None or not hmac.compare_digest(rec.sha256, digest(token)):
            return None
        return rec

    def active(self, token_id: str) -> bool:
        """Whether the token with this id exists (a revoked one does not)."""
        return token_id in self._records()

    # --- changing (``vmagent token``, as root on the host) ----------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, TokenRecord]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(FILE + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._cache = None
            records = dict(self._records())
            yield records
            write_record(self.path, {"tokens": [asdict(r) for r in records.values()]},
                         FORMAT, mode=0o600)
            self._cache = None

    def add(self, user: str, role: str = Role.USER.value) -> tuple[TokenRecord, str]:
        """A new token for ``user``: (its record, the token, shown once)."""
        if not isinstance(user, str) or not USER_RE.fullmatch(user):
            raise BadRequest(f"user {str(user)[:40]!r} is not a valid user name")
        if role not in (Role.USER.value, Role.OPERATOR.value, Role.METRICS.value):
            raise BadRequest(f"role {role!r}: use user, operator or metrics")
        token_id = os.urandom(6).hex()
        secret = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        token = f"{PREFIX}{token_id}_{secret}"
        rec = TokenRecord(token_id, user, role, digest(token),
                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with self._locked() as records:
            records[token_id] = rec
        return rec, token

    def revoke(self, token_id: str) -> TokenRecord:
        with self._locked() as records:
            rec = records.pop(token_id, None)
            if rec is None:
                raise NotFound(f"no token with id {token_id!r} (see 'vmagent token list')")
        return rec
