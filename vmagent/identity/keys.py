"""The key registry: a person's public SSH keys, the ones that get into their VMs.

Sources, asked in order; the first that has keys for the person gives them:

1. the keys directory ``STATE_DIR/keys/USER.pub`` (authorized_keys lines), which each
   user manages for themself (``vmctl key add FILE | list | rm``);
2. optionally an HTTP URL template such as ``https://keys.example.org/{user}.keys``
   (the way GitHub serves ``.keys``), fetched with a timeout and cached for a TTL in
   ``STATE_DIR/cache/keys/``; when the source is down, the cached keys are served
   stale with a warning, and without a cache the error says so.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp

from vmagent.errors import BadRequest, NotFound, Unavailable
from vmagent.fsutil import atomic_write
from vmagent.spec import SSH_KEY_RE, USER_RE

log = logging.getLogger(__name__)

KEYS_DIR = "keys"
CACHE_DIR = "cache/keys"
MAX_KEYS = 64
URL_MAX_BYTES = 256 * 1024
FETCH_TIMEOUT = 5.0
CACHE_TTL = 300.0


def check_user(user: object) -> str:
    if not isinstance(user, str) or not USER_RE.fullmatch(user):
        raise BadRequest(f"user {str(user)[:40]!r} is not a valid user name")
    return user


def parse_keys(text: str, strict: bool = True) -> list[str]:
    """The public keys of authorized_keys-style text; ``strict``: refuse a line that is
    not one (what a user adds), else skip it (what a URL serves)."""
    keys: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not SSH_KEY_RE.match(line) or _blob(line) is None:
            if strict:
                raise BadRequest(f"line {n} is not an OpenSSH public key: {line[:40]!r}")
            continue
        if line not in keys:
            keys.append(line)
    return keys


def _blob(key: str) -> bytes | None:
    try:
        return base64.b64decode(key.split()[1], validate=True)
    except (IndexError, binascii.Error, ValueError):
        return None


def fingerprint(key: str) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    blob = _blob(key) or b""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def describe(key: str, source: str) -> dict:
    parts = key.split(None, 2)
    return {"key": key, "type": parts[0], "fingerprint": fingerprint(key),
            "comment": parts[2] if len(parts) > 2 else "", "source": source}


@dataclass
class Resolved:
    user: str
    keys: list[str] = field(default_factory=list)
    source: str | None = None      # where they came from
    warning: str | None = None     # served stale, ...


class KeysDir:
    name = "keys-dir"

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / KEYS_DIR

    def path(self, user: str) -> Path:
        return self.root / f"{check_user(user)}.pub"

    async def keys(self, user: str) -> Resolved | None:
        try:
            text = self.path(user).read_text()
        except FileNotFoundError:
            return None
        keys = parse_keys(text, strict=False)
        return Resolved(user, keys, self.name) if keys else None

    def _write(self, user: str, keys: list[str]) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if keys:
            atomic_write(self.path(user), "".join(k + "\n" for k in keys).encode(), 0o600)
        else:
            self.path(user).unlink(missing_ok=True)

    def current(self, user: str) -> list[str]:
        try:
            return parse_keys(self.path(user).read_text(), strict=False)
        except FileNotFoundError:
            return []

    def add(self, user: str, new: list[str]) -> list[str]:
        keys = self.current(user)
        keys += [k for k in new if k not in keys]
        if len(keys) > MAX_KEYS:
            raise BadRequest(f"{user} would have {len(keys)} keys; at most {MAX_KEYS}")
        self._write(user, keys)
        return keys

    def remove(self, user: str, which: str) -> list[str]:
        """Remove the keys matching ``which``: a fingerprint, a comment or the key."""
        keys = self.current(user)
        keep = [k for k in keys if which not in (k, fingerprint(k), describe(k, "")["comment"])]
        if len(keep) == len(keys):
            raise NotFound(f"{user} has no key {which!r} in the keys directory "
                           "(see 'vmctl key list')")
        self._write(user, keep)
        return [k for k in keys if k not in keep]


class KeysURL:
    name = "url"

    def __init__(self, template: str, state_dir: Path, *, timeout: float = FETCH_TIMEOUT,
                 ttl: float = CACHE_TTL) -> None:
        if "{user}" not in template or not template.startswith(("http://", "https://")):
            raise ValueError("the keys URL must be http(s) and contain {user}")
        self.template = template
        self.cache = Path(state_dir) / CACHE_DIR
        self.timeout = timeout
        self.ttl = ttl

    def url(self, user: str) -> str:
        return self.template.replace("{user}", quote(check_user(user)))

    def _cached(self, user: str) -> tuple[float, list[str]] | None:
        try:
            doc = json.loads((self.cache / f"{user}.json").read_text())
            return float(doc["fetched"]), list(doc["keys"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _fetch(self, url: str) -> list[str] | None:
        """The keys served at ``url`` (None: the source has no entry, 404)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                      message=resp.reason or "")
                data = await resp.content.read(URL_MAX_BYTES + 1)
                if len(data) > URL_MAX_BYTES:
                    raise ValueError(f"over {URL_MAX_BYTES} bytes")
        return parse_keys(data.decode("utf-8", "replace"), strict=False)

    async def keys(self, user: str) -> Resolved | None:
        cached = self._cached(user)
        if cached is not None and time.time() - cached[0] < self.ttl:
            return Resolved(user, cached[1], self.name) if cached[1] else None
        url = self.url(user)
        try:
            keys = await self._fetch(url)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if cached is not None:
                age = time.time() - cached[0]
                warning = (f"the key source {url} is unreachable ({problem}); using the "
                           f"keys cached {age:.0f}s ago")
                log.warning("%s", warning)
                return Resolved(user, cached[1], self.name, warning) if cached[1] else None
            raise Unavailable(f"the key source {url} is unreachable ({problem}) and no "
                              f"keys of {user} are cached", user=user, url=url) from None
        self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.cache / f"{user}.json",
                     json.dumps({"fetched": time.time(), "keys": keys or []}).encode(), 0o600)
        return Resolved(user, keys, self.name) if keys else None


class KeyRegistry:
    def __init__(self, keys_dir: KeysDir, url: KeysURL | None = None) -> None:
        self.dir = keys_dir
        self.sources: list[KeysDir | KeysURL] = [keys_dir] + ([url] if url else [])

    async def resolve(self, user: str) -> Resolved:
        """The person's keys from the first source that has some (none: empty)."""
        check_user(user)
        for source in self.sources:
            found = await source.keys(user)
            if found is not None:
                return found
        return Resolved(user)
