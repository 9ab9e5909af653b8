"""Filesystem helpers: atomic writes (write, fsync, rename), versioned JSON records,
directories staged under a hidden name and committed by one rename, hashing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never
    a torn one, even across a crash: write a temp file, fsync it, rename, fsync the dir."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int = 0o644) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- directories that appear and disappear at once ----------------------------------

STAGING_PREFIX = ".new-"
GRAVE_PREFIX = ".del-"


def rmtree_force(path: Path) -> None:
    """Remove a tree, read-only files and directories included (frozen templates)."""
    path = Path(path)
    if not path.exists():
        return
    for p in path.rglob("*"):
        try:
            if not p.is_symlink():
                os.chmod(p, 0o700 if p.is_dir() else 0o600)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


class StagedDir:
    """A directory built under a hidden name in ``parent`` and made visible by one
    rename (:meth:`commit`). Leaving the ``with`` block without a commit (an error, a
    cancellation) removes it, so nothing half-made is ever seen under its final name;
    a crash leaves only hidden names, which :func:`sweep` removes at the next start."""

    def __init__(self, parent: Path, name: str, mode: int = 0o750) -> None:
        self.parent = Path(parent)
        self.path = self.parent / f"{STAGING_PREFIX}{name}-{os.urandom(4).hex()}"
        self.mode = mode
        self.committed: Path | None = None

    def __enter__(self) -> "StagedDir":
        self.path.mkdir(mode=self.mode)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.committed is None:
            rmtree_force(self.path)

    def commit(self, final: Path) -> Path:
        """Rename to ``final`` (FileExistsError if it exists) and make it durable."""
        final = Path(final)
        if final.exists():
            raise FileExistsError(str(final))
        os.rename(self.path, final)
        fsync_dir(final.parent)
        self.committed = final
        return final


def remove_dir(path: Path) -> None:
    """Remove a directory so that it disappears at once: renamed to a hidden grave
    first (durably), then deleted. Works on a full file system (nothing is written)."""
    path = Path(path)
    grave = path.parent / f"{GRAVE_PREFIX}{path.name}-{os.urandom(4).hex()}"
    os.rename(path, grave)
    fsync_dir(path.parent)
    rmtree_force(grave)


def sweep(parent: Path) -> list[Path]:
    """Remove what a crash left in ``parent``: staged and half-removed directories."""
    gone = []
    for p in Path(parent).iterdir():
        if p.name.startswith((STAGING_PREFIX, GRAVE_PREFIX)):
            rmtree_force(p)
            gone.append(p)
    return gone


# --- versioned records ----------------------------------------------------------------

FORMAT_KEY = "format"


class FormatError(ValueError):
    """A record of a format this agent cannot read (newer, or not a record)."""


def write_record(path: str | os.PathLike, doc: dict[str, Any], version: int,
                 mode: int = 0o644) -> None:
    """Write a JSON record with its format version, atomically."""
    atomic_write_json(path, {FORMAT_KEY: version, **doc}, mode)


def read_record(path: str | os.PathLike, version: int,
                upgrades: dict[int, Any] | None = None) -> dict[str, Any]:
    """Read a record written by :func:`write_record` and bring it to ``version``:
    ``upgrades[n]`` turns a format-``n`` document into format ``n + 1`` (a file
    without a format key is format 0). A newer format is refused (FormatError): an
    older agent must not rewrite what a newer one wrote."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: not a JSON object")
    have = doc.pop(FORMAT_KEY, 0)
    if not isinstance(have, int) or have < 0:
        raise FormatError(f"{path}: invalid format {have!r}")
    if have > version:
        raise FormatError(f"{path} has format {have}, newer than this agent's {version}: "
                          "it was written by a newer vmagent")
    while have < version:
        step = (upgrades or {}).get(have)
        doc = step(doc) if step else doc
        have += 1
    return doc


def tail_lines(path: str | os.PathLike, lines: int = 30, window: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a text file (read from its last ``window`` bytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - window))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
