"""Disk files: ``qemu-img`` wrappers (async, argv only, never a shell) and sparse copying.

Instance disks are qcow2 overlays on a read-only base image in the store; they are never
copies. Every qemu-img failure raises :class:`QemuImgError` with the command and output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from vmagent import errors
from vmagent.spec import format_size

QEMU_IMG = "qemu-img"
BLOCK = 64 * 1024          # granularity of hole detection (one qcow2 cluster)
CHUNK = 1024 * 1024        # read size
_ZERO = bytes(CHUNK)


class QemuImgError(errors.ImageError):
    """``qemu-img`` failed: carries the argv, the exit code and what it printed."""

    def __init__(self, command: list[str], exitcode: int | None, output: str) -> None:
        self.command = list(command)
        self.exitcode = exitcode
        self.output = output
        lines = output.strip().splitlines()
        summary = lines[-1] if lines else f"exit code {exitcode}"
        super().__init__(f"qemu-img {command[1] if len(command) > 1 else ''} failed: {summary}",
                         command=self.command, exitcode=exitcode, output=output)


def _abs(path: str | os.PathLike) -> str:
    """``path`` made absolute: qemu-img reads a relative name with a ':' before any '/'
    as a protocol (``nbd:host:port``, ``json:{...}``, ``file:...``), never as a file."""
    return os.path.abspath(os.fspath(path))


async def run_qemu_img(*args: str | os.PathLike) -> str:
    """Run ``qemu-img args...`` and return its stdout; :class:`QemuImgError` on failure.
    If the caller is cancelled the process is killed."""
    argv = [QEMU_IMG, *map(os.fspath, args)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise QemuImgError(argv, None, f"cannot run {QEMU_IMG}: {exc}") from None
    try:
        out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise QemuImgError(argv, proc.returncode, err.decode(errors="replace"))
    return out.decode(errors="replace")


async def qemu_img_info(path: str | os.PathLike, fmt: str | None = None, *,
                        force_share: bool = False) -> dict[str, Any]:
    """``qemu-img info --output=json``. Without ``fmt`` qemu-img probes the format.
    ``force_share`` (``-U``) reads an image that a running VM holds open."""
    args: list[str | os.PathLike] = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    if force_share:
        args.append("-U")
    out = await run_qemu_img(*args, "--", _abs(path))
    try:
        return json.loads(out)
    except ValueError:
        raise errors.ImageError(f"qemu-img info printed no JSON for {path}",
                                output=out) from None


async def create_overlay(base: Path, base_format: str, dest: Path, size: int) -> None:
    """Create ``dest``, a qcow2 overlay of ``size`` bytes backed by ``base``.

    ``size`` must be at least the base's virtual size (a disk can only grow). ``dest``
    must not exist; on failure nothing is left at ``dest``."""
    base, dest = Path(_abs(base)), Path(_abs(dest))
    if not base.is_file():
        raise errors.ImageError(f"base image {base} does not exist")
    if dest.exists() or dest.is_symlink():
        raise errors.Conflict(f"disk {dest} already exists")
    info = await qemu_img_info(base, base_format, force_share=True)
    if size < info["virtual-size"]:
        raise errors.BadRequest(
            f"disk size {format_size(size)} is smaller than the base image "
            f"({format_size(info['virtual-size'])}); a disk can only grow")
    try:
        await run_qemu_img("create", "-q", "-f", "qcow2", "-F", base_format, "-b", base,
                           "--", dest, str(size))
    except BaseException:
        try:
            dest.unlink()
        except FileNotFoundError:
            pass
        raise


async def resize(path: str | os.PathLike, size: int) -> None:
    """Grow the disk at ``path`` to ``size`` bytes (shrinking is refused, equal is a no-op)."""
    info = await qemu_img_info(path)
    current = info["virtual-size"]
    if size < current:
        raise errors.BadRequest(f"disk size {format_size(size)} is smaller than the current "
                                f"{format_size(current)}; a disk can only grow")
    if size > current:
        await run_qemu_img("resize", "-q", "-f", info["format"], "--", _abs(path),
                           str(size))


async def snapshot_list(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The internal snapshots of a qcow2 disk (readable while the VM runs: ``-U``).

    Each dict is qemu-img's (``id``, ``name``, ``vm-state-size``, ``date-sec``, ...)
    plus ``created``, the date as ISO 8601 UTC."""
    info = await qemu_img_info(path, force_share=True)
    snaps = []
    for snap in info.get("snapshots", []):
        snap = dict(snap)
        if "date-sec" in snap:
            snap["created"] = datetime.fromtimestamp(
                snap["date-sec"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        snaps.append(snap)
    return snaps


class SparseWriter:
    """Write a stream to a file, leaving holes where whole blocks are zero, and hash it.

    Blocking: call from a thread. ``close()`` sets the final size and fsyncs."""

    def __init__(self, path: Path, algorithms: Iterable[str] = ("sha256",)) -> None:
        self.path = Path(path)
        self.hashes = {a: hashlib.new(a) for a in dict.fromkeys(("sha256", *algorithms))}
        self.size = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                           0o644)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        for h in self.hashes.values():
            h.update(data)
        data = bytes(data)
        if data != _ZERO[:len(data)]:
            for i in range(0, len(data), BLOCK):
                block = data[i:i + BLOCK]
                if block != _ZERO[:len(block)]:
                    os.pwrite(self._fd, block, self.size + i)
        self.size += len(data)

    def digest(self, algorithm: str) -> str:
        return self.hashes[algorithm].hexdigest()

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SparseWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.abort() if exc_type else self.close()


def sparse_copy(src: Path, dest: Path, algorithms: Iterable[str] = ("sha256",)) -> SparseWriter:
    """Copy ``src`` to ``dest`` keeping zero blocks as holes; returns the (closed) writer
    whose ``digest()`` and ``size`` describe the data. Blocking: call from a thread."""
    with open(src, "rb", buffering=0) as f, SparseWriter(dest, algorithms) as w:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            w.write(view[:n])
    return w
