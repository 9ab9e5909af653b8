"""HTTP downloads for the image store: stream a URL to a sparse file while hashing it, and
read published SHA256SUMS/SHA512SUMS files. Every failure is an :class:`ImageError`.

Every download is bounded (:class:`Limits`): a total deadline, and a minimum rate over
a sliding window (a server that trickles bytes is given up on, not followed forever);
a server that stalls hits the read timeout. Where a URL may lead is decided by
:class:`AddressPolicy` at connect time (after DNS, so a name cannot be rebound to a
forbidden address): link-local, multicast and unspecified addresses are always refused
(a cloud's metadata service lives at 169.254.169.254), loopback and private networks
only when the operator allows them (``vmagent serve --allow-local-urls``)."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp

from vmagent.qemu import disks

from vmagent import errors

SUMS_MAX = 1 << 20
HEX_LEN = {64: "sha256", 128: "sha512"}
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}|[0-9a-fA-F]{128})\s+\*?(.+?)\s*$")
_BSD_LINE = re.compile(r"^(SHA256|SHA512) \((.+)\) = ([0-9a-fA-F]+)\s*$")
_BSD_LEN = {"SHA256": 64, "SHA512": 128}

Progress = Callable[[int, "int | None"], Any]


@dataclass(frozen=True)
class Limits:
    deadline: float = 3600.0        # seconds for the whole pull
    min_rate: int = 64 * 1024       # bytes per second, averaged over ``window``
    window: float = 60.0

    def clock(self) -> "Clock":
        return Clock(self)


class Clock:
    """Where one pull stands against its limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.start = time.monotonic()
        self.marks: list[tuple[float, int]] = [(self.start, 0)]

    def remaining(self) -> float:
        return self.limits.deadline - (time.monotonic() - self.start)

    def check(self, url: str, done: int) -> None:
        now = time.monotonic()
        if now - self.start > self.limits.deadline:
            raise errors.ImageError(f"download of {url} did not finish within its deadline "
                                    f"of {self.limits.deadline:g}s ({done} bytes so far)",
                                    url=url)
        self.marks.append((now, done))
        while len(self.marks) > 2 and now - self.marks[1][0] >= self.limits.window:
            self.marks.pop(0)
        t0, d0 = self.marks[0]
        if now - t0 >= self.limits.window:
            rate = (done - d0) / (now - t0)
            if rate < self.limits.min_rate:
                raise errors.ImageError(
                    f"download of {url} is too slow: {rate / 1024:.1f} KiB/s over the last "
                    f"{now - t0:.0f}s (at least {self.limits.min_rate // 1024} KiB/s)",
                    url=url)


class AddressPolicy(aiohttp.abc.AbstractResolver):
    """A resolver that drops the addresses a pull may not connect to."""

    def __init__(self, allow_local: bool = False) -> None:
        self.allow_local = allow_local
        self._inner: aiohttp.abc.AbstractResolver | None = None   # made in the loop

    def refused(self, address: str) -> str | None:
        ip = ipaddress.ip_address(address)
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
            return "link-local, multicast or reserved"
        if not self.allow_local and (ip.is_loopback or ip.is_private):
            return "loopback or private (vmagent serve --allow-local-urls allows them)"
        return None

    def check_url(self, url: str) -> None:
        """Refuse a URL whose host is an address literal the policy forbids (names are
        checked when they resolve)."""
        host = urlsplit(url).hostname or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return
        if (why := self.refused(host)) is not None:
            raise errors.ImageError(f"{url}: pulls may not reach {host}, an address that "
                                    f"is {why}", url=url)

    def trace(self) -> aiohttp.TraceConfig:
        """Checks every request of a session, redirects included."""
        config = aiohttp.TraceConfig()

        async def on_start(session: Any, ctx: Any, params: Any) -> None:
            self.check_url(str(params.url))

        async def on_redirect(session: Any, ctx: Any, params: Any) -> None:
            location = params.response.headers.get("Location")
            if location:
                self.check_url(urljoin(str(params.url), location))
        config.on_request_start.append(on_start)
        config.on_request_redirect.append(on_redirect)
        return config

    def session(self, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=timeout, trace_configs=[self.trace()],
                                     connector=aiohttp.TCPConnector(resolver=self))

    async def resolve(self, host: str, port: int = 0,
                      family: int = socket.AF_INET) -> list[dict[str, Any]]:
        if self._inner is None:
            self._inner = aiohttp.DefaultResolver()
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if self.refused(r["host"]) is None]
        if not allowed:
            why = self.refused(found[0]["host"]) if found else "no address"
            raise errors.ImageError(f"{host} resolves to {found[0]['host'] if found else '?'},"
                                    f" an address pulls may not reach: it is {why}",
                                    host=host)
        return allowed

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
            self._inner = None


def basename(url: str) -> str:
    """The file name a URL names, as a SUMS file lists it (percent-decoded)."""
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def parse_sums(text: str) -> dict[str, str]:
    """A SHA256SUMS/SHA512SUMS file: ``{file name: lowercase hex digest}``. Accepts
    ``HASH  name``, ``HASH *name`` and BSD ``SHA256 (name) = HASH`` lines; lines whose
    digest does not have the length of a sha256/sha512 digest are ignored."""
    sums = {}
    for line in text.splitlines():
        if m := _SUMS_LINE.match(line):
            digest, name = m.groups()
        elif m := _BSD_LINE.match(line):
            algo, name, digest = m.groups()
            if len(digest) != _BSD_LEN[algo]:
                continue
        else:
            continue
        sums[name.removeprefix("./")] = digest.lower()
    return sums


def expected(url: str, given: dict[str, str | None], sums: dict[str, str] | None,
             checksum_url: str | None) -> dict[str, str]:
    """The digests ``{algorithm: hex}`` that the file at ``url`` must have: the ``given``
    ones that are set plus, with a ``checksum_url``, its entry in ``sums``."""
    want = {algo: hexd for algo, hexd in given.items() if hexd}
    if checksum_url:
        hexd = (sums or {}).get(basename(url))
        if hexd is None:
            raise errors.ImageError(f"{basename(url)} is not listed in {checksum_url}",
                                    url=url)
        want[HEX_LEN[len(hexd)]] = hexd
    if not want:
        raise errors.ImageError(f"no digest to verify {url} with", url=url)
    return want


class Request:
    """``session.get`` as a context manager that maps failures to :class:`ImageError`."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url, self.resp = session, url, None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            self.resp = await self.session.get(self.url)
        except TimeoutError:
            raise errors.ImageError(f"connecting to {self.url} timed out",
                                    url=self.url) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.ImageError(f"download of {self.url} failed: {exc}",
                                    url=self.url) from None
        if self.resp.status != 200:
            status, reason = self.resp.status, self.resp.reason
            self.resp.release()
            raise errors.ImageError(f"download of {self.url} failed: HTTP {status} {reason}",
                                    url=self.url, status=status)
        return self.resp

    async def __aexit__(self, *exc: Any) -> None:
        if self.resp is not None:
            self.resp.release()


async def chunks(resp: aiohttp.ClientResponse, url: str,
                 clock: Clock | None = None) -> AsyncIterator[bytes]:
    done = 0
    try:
        async for chunk in resp.content.iter_chunked(disks.CHUNK):
            done += len(chunk)
            if clock is not None:
                clock.check(url, done)
            yield chunk
    except TimeoutError:
        raise errors.ImageError(f"download of {url} stalled (read timeout)",
                                url=url) from None
    except aiohttp.ClientError as exc:
        raise errors.ImageError(f"download of {url} failed: {exc}", url=url) from None


async def fetch_sums(session: aiohttp.ClientSession, url: str,
                     clock: Clock | None = None) -> dict[str, str]:
    """Download and parse a SHA256SUMS/SHA512SUMS file (at most ``SUMS_MAX`` bytes)."""
    data = bytearray()
    async with Request(session, url) as resp:
        async for chunk in chunks(resp, url, clock):
            data += chunk
            if len(data) > SUMS_MAX:
                raise errors.ImageError(f"checksum file {url} is over {SUMS_MAX} bytes",
                                        url=url)
    return parse_sums(data.decode(errors="replace"))


async def _report(progress: Progress | None, done: int, total: int | None) -> None:
    if progress is not None and inspect.isawaitable(r := progress(done, total)):
        await r


async def download(session: aiohttp.ClientSession, url: str, dest: Path,
                   want: dict[str, str], progress: Progress | None,
                   clock: Clock | None = None) -> disks.SparseWriter:
    """Stream ``url`` to ``dest`` (sparse), hashing as it goes; check ``want``
    (``{algorithm: hex}``). Returns the closed writer (``digest()``, ``size``)."""
    w = await asyncio.to_thread(disks.SparseWriter, dest, tuple(want))
    clock = clock or Limits().clock()
    try:
        async with Request(session, url) as resp:
            total, done, buf = resp.content_length, 0, bytearray()
            async for chunk in chunks(resp, url, clock):
                buf += chunk
                if len(buf) >= 4 * disks.CHUNK:
                    await asyncio.to_thread(w.write, bytes(buf))
                    done += len(buf)
                    buf.clear()
                    await _report(progress, done, total)
            await asyncio.to_thread(w.write, bytes(buf))
            done += len(buf)
            await _report(progress, done, total)
        await asyncio.to_thread(w.close)
    finally:
        w.abort()
    for algo, hexd in want.items():
        if w.digest(algo) != hexd:
            raise errors.ImageError(f"{algo} mismatch for {url}: expected {hexd}, "
                                    f"got {w.digest(algo)}", url=url)
    return w
