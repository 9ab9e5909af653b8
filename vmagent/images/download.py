"""HTTP downloads for the image store: stream a URL to a sparse file while hashing it, and
read published SHA256SUMS/SHA512SUMS files. Every failure is an :class:`ImageError`."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import unquote, urlsplit

import aiohttp

from vmagent.qemu import disks

from vmagent import errors

SUMS_MAX = 1 << 20
HEX_LEN = {64: "sha256", 128: "sha512"}
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}|[0-9a-fA-F]{128})\s+\*?(.+?)\s*$")
_BSD_LINE = re.compile(r"^(SHA256|SHA512) \((.+)\) = ([0-9a-fA-F]+)\s*$")
_BSD_LEN = {"SHA256": 64, "SHA512": 128}

Progress = Callable[[int, "int | None"], Any]


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
        except aiohttp.ClientError as exc:
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


async def chunks(resp: aiohttp.ClientResponse, url: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.content.iter_chunked(disks.CHUNK):
            yield chunk
    except TimeoutError:
        raise errors.ImageError(f"download of {url} stalled (read timeout)",
                                url=url) from None
    except aiohttp.ClientError as exc:
        raise errors.ImageError(f"download of {url} failed: {exc}", url=url) from None


async def fetch_sums(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """Download and parse a SHA256SUMS/SHA512SUMS file (at most ``SUMS_MAX`` bytes)."""
    data = bytearray()
    async with Request(session, url) as resp:
        async for chunk in chunks(resp, url):
            data += chunk
            if len(data) > SUMS_MAX:
                raise errors.ImageError(f"checksum file {url} is over {SUMS_MAX} bytes",
                                        url=url)
    return parse_sums(data.decode(errors="replace"))


async def _report(progress: Progress | None, done: int, total: int | None) -> None:
    if progress is not None and inspect.isawaitable(r := progress(done, total)):
        await r


async def download(session: aiohttp.ClientSession, url: str, dest: Path,
                   want: dict[str, str], progress: Progress | None) -> disks.SparseWriter:
    """Stream ``url`` to ``dest`` (sparse), hashing as it goes; check ``want``
    (``{algorithm: hex}``). Returns the closed writer (``digest()``, ``size``)."""
    w = await asyncio.to_thread(disks.SparseWriter, dest, tuple(want))
    try:
        async with Request(session, url) as resp:
            total, done, buf = resp.content_length, 0, bytearray()
            async for chunk in chunks(resp, url):
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
