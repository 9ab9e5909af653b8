"""The image store: read-only base disks that instance overlays are created on.

Layout: ``root/<name>/image.json`` (metadata), ``root/<name>/disk.qcow2`` or ``disk.raw``
(mode 0444), optionally ``vmlinuz`` and ``initrd.img``. Imports and downloads are built in
``root/.staging/<random>/`` and appear by one rename, so a failure leaves nothing in the
store and a crash leaves only staging directories, which the store removes on start.
A derived image (a catalog entry with ``base``) has only an ``image.json``: its ``path``
is the base's disk and its ``cloud_config`` carries the packages to install.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import aiohttp

from vmagent.qemu import disks

from vmagent.images import download, files
from vmagent.images.files import Reader

from vmagent import errors
from vmagent.images.catalog import DEFAULT_APPEND, Catalog, CatalogEntry
from vmagent.images.download import Progress
from vmagent.fsutil import atomic_write_json, fsync_dir, read_json, sha256_file
from vmagent.spec import check_image_name

log = logging.getLogger(__name__)

FORMATS = ("qcow2", "raw")


@dataclass
class Image:
    """An image in the store. For a derived image ``path`` is the base's disk."""

    name: str
    format: str
    path: Path
    virtual_size: int
    actual_size: int               # bytes this image occupies in the store (0 if derived)
    sha256: str
    boot: str = "disk"             # "disk" (BIOS) or "kernel" (kernel/initrd/append)
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    base: str | None = None
    cloud_config: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("path", "kernel", "initrd"):
            out[key] = str(out[key]) if out[key] is not None else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> "Image":
        """Rebuild a record; the image's own files are found in ``directory``."""
        known = {f.name for f in dataclasses.fields(cls)}
        img = cls(**{k: v for k, v in data.items() if k in known})
        if img.base is None:
            img.path = directory / f"disk.{img.format}"
            img.kernel = directory / "vmlinuz" if img.kernel else None
            img.initrd = directory / "initrd.img" if img.initrd else None
        else:
            img.path = Path(img.path)
            img.kernel = Path(img.kernel) if img.kernel else None
            img.initrd = Path(img.initrd) if img.initrd else None
        return img


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value.strip()):
        raise errors.BadRequest(f"sha256: expected 64 hex digits, got {str(value)[:80]!r}")
    return value.strip().lower()


def _check_url(url: Any, what: str = "url") -> str:
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") \
            or not urlsplit(url).netloc:
        raise errors.BadRequest(f"{what}: expected an http(s) URL, got {str(url)[:200]!r}")
    return url


class ImageStore:
    """Images under ``root``; ``catalog`` says what :meth:`pull` can fetch by name."""

    def __init__(self, root: Path, catalog: Catalog, *, connect_timeout: float = 30.0,
                 read_timeout: float = 60.0, allow_local_urls: bool = False,
                 lock_wait: float = 30.0) -> None:
        self.root = Path(root)
        self.catalog = catalog
        self.policy = download.AddressPolicy(allow_local_urls)
        self.lock_wait = lock_wait
        self.staging = self.root / ".staging"
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                             sock_connect=connect_timeout,
                                             sock_read=read_timeout)
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(mode=0o700, exist_ok=True)

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        """The image's lock, waited for at most ``lock_wait`` seconds: a long pull or
        build of the same image makes a request fail clearly, never hang."""
        lock = self._locks[name]
        try:
            await asyncio.wait_for(lock.acquire(), self.lock_wait)
        except asyncio.TimeoutError:
            raise errors.Conflict(f"image {name!r} is busy (a pull, import or build of it "
                                  f"is running); gave up after {self.lock_wait:g}s",
                                  image=name) from None
        try:
            yield
        finally:
            lock.release()

    # --- reading -------------------------------------------------------------------

    def _load(self, name: str) -> Image:
        directory = self.root / name
        try:
            data = read_json(directory / "image.json")
        except FileNotFoundError:
            entry = self.catalog.entries.get(name)
            hint = ("" if entry is None else f"; pull it with 'vmctl image pull {name}'"
                    if entry.downloadable else f"; build it with 'vmctl image build {name}'")
            raise errors.NotFound(f"image {name!r} is not in the store{hint}",
                                  image=name) from None
        return Image.from_json(data, directory)

    def get(self, name: str) -> Image:
        """The image ``name`` (NotFound). A derived image shows its base's current disk."""
        check_image_name(name)
        img = self._load(name)
        if img.base is not None:
            try:
                base = self._load(img.base)
            except errors.NotFound:
                return img
            img = dataclasses.replace(
                img, format=base.format, path=base.path, virtual_size=base.virtual_size,
                sha256=base.sha256, boot=base.boot, kernel=base.kernel,
                initrd=base.initrd, append=base.append)
        return img

    def exists(self, name: str) -> bool:
        return (self.root / check_image_name(name) / "image.json").is_file()

    def list(self) -> list[Image]:
        images = []
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith(".") or not (directory / "image.json").is_file():
                continue
            try:
                images.append(self.get(directory.name))
            except (OSError, ValueError, TypeError, errors.VMAgentError) as exc:
                log.warning("skipping unreadable image %s: %s", directory, exc)
        return images

    def resolve(self, name: str) -> Image:
        """The record to create a VM from: ``path`` is the disk to put the overlay on
        (the base's disk for a derived image, whose ``cloud_config`` is kept)."""
        img = self.get(name)
        if img.base is not None and not self.exists(img.base):
            raise errors.ImageError(f"image {name!r} is derived from {img.base!r}, which is "
                                    f"missing; pull {img.base!r} again", image=name)
        if not img.path.is_file():
            raise errors.ImageError(f"the disk of image {name!r} is missing: {img.path}")
        return img

    # --- staging -------------------------------------------------------------------

    def _stage(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.staging))

    async def _discard(self, path: Path) -> None:
        if path.exists():
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, path, True))

    def _commit(self, stage: Path, image: Image) -> Image:
        """Write image.json into ``stage`` and rename it to ``root/<name>`` (lock held)."""
        final = self.root / image.name
        if final.exists():
            raise errors.Conflict(f"image {image.name!r} already exists", image=image.name)
        if image.base is None:
            for f in (image.path, image.kernel, image.initrd):
                if f is not None:
                    os.chmod(f, 0o444)
            # the record names the files where they will be, not in staging
            image = dataclasses.replace(
                image, path=final / image.path.name,
                kernel=final / image.kernel.name if image.kernel else None,
                initrd=final / image.initrd.name if image.initrd else None)
        atomic_write_json(stage / "image.json", image.to_json())
        os.chmod(stage, 0o755)
        os.rename(stage, final)
        fsync_dir(self.root)
        return self.get(image.name)

    async def _check_disk(self, path: Path, expect: str | None = None) -> dict[str, Any]:
        """Probe ``path`` with qemu-img and refuse what must not be a base image."""
        info = await disks.qemu_img_info(path)
        fmt = info.get("format")
        if fmt not in FORMATS:
            raise errors.ImageError(f"image format {fmt!r} is not supported (use qcow2 or "
                                    "raw): convert it with 'qemu-img convert -O qcow2 SRC "
                                    "DEST'", format=fmt)
        if expect is not None and fmt != expect:
            raise errors.ImageError(f"the image is {fmt}, not {expect} as declared")
        if "backing-filename" in info:
            raise errors.ImageError(
                f"the image has a backing file ({info['backing-filename']}); a base image "
                "must be self-contained: flatten it with 'qemu-img convert -O qcow2'")
        data = info.get("format-specific", {}).get("data", {})
        if "data-file" in data:
            raise errors.ImageError(f"the image uses an external data file "
                                    f"({data['data-file']}); convert it with 'qemu-img "
                                    "convert -O qcow2' first")
        if info.get("encrypted") or data.get("corrupt"):
            raise errors.ImageError("the image is encrypted or marked corrupt")
        return info

    # --- import --------------------------------------------------------------------

    async def import_file(self, name: str, path: str | os.PathLike, *,
                          kernel: str | os.PathLike | None = None,
                          initrd: str | os.PathLike | None = None, append: str | None = None,
                          sha256: str | None = None, description: str | None = None,
                          reader: Reader = Reader()) -> Image:
        """Copy a disk (and optionally a kernel and initrd) from this host into the store;
        the files are opened with ``reader``'s rights (the caller's) and must be what
        they claim to be (:mod:`vmagent.images.files`)."""
        check_image_name(name)
        sha256 = _check_sha256(sha256)
        if initrd is not None and kernel is None:
            raise errors.BadRequest("initrd given without kernel")
        if append is not None and kernel is None:
            raise errors.BadRequest("append is only used with kernel")
        for what, f in (("path", path), ("kernel", kernel), ("initrd", initrd)):
            if f is not None and not isinstance(f, (str, os.PathLike)):
                raise errors.BadRequest(f"{what}: expected a file name")
        fds: dict[str, int] = {}
        try:
            fds["path"] = await reader.open(path, "path")
            for what, f in (("kernel", kernel), ("initrd", initrd)):
                if f is not None:
                    fds[what] = await reader.open(f, what)
                    files.check_content(fds[what], what, f"{what} {f}")
            async with self._locked(name):
                if self.exists(name):
                    raise errors.Conflict(f"image {name!r} already exists", image=name)
                # refuse early, before a long copy
                info = await self._check_disk(files.fd_path(fds["path"]))
                if info["format"] == "raw":
                    problem = files.raw_disk_problem(files.read_header(fds["path"]),
                                                     os.fstat(fds["path"]).st_size)
                    if problem:
                        raise errors.ImageError(f"path {path}: the raw image is refused: "
                                                f"{problem}")
                return await self._import_staged(name, path, fds, sha256, append,
                                                 description)
        finally:
            for fd in fds.values():
                os.close(fd)

    async def _import_staged(self, name: str, path: str | os.PathLike,
                             fds: dict[str, int], sha256: str | None, append: str | None,
                             description: str | None) -> Image:
        stage = self._stage()
        try:
            part = stage / "disk.part"
            w = await asyncio.to_thread(files.copy_fd, fds["path"], part)
            got = w.digest("sha256")
            if sha256 and got != sha256:
                raise errors.ImageError(f"sha256 mismatch: expected {sha256}, got {got}")
            info = await self._check_disk(part)
            await files.check_disk_file(part, info["format"])
            disk = stage / f"disk.{info['format']}"
            os.rename(part, disk)
            kernel = "kernel" in fds
            for what, dst in (("kernel", "vmlinuz"), ("initrd", "initrd.img")):
                if what in fds:
                    await asyncio.to_thread(files.copy_fd, fds[what], stage / dst)
            image = Image(
                name=name, format=info["format"], path=disk,
                virtual_size=info["virtual-size"], actual_size=info["actual-size"],
                sha256=got, boot="kernel" if kernel else "disk",
                kernel=stage / "vmlinuz" if kernel else None,
                initrd=stage / "initrd.img" if "initrd" in fds else None,
                append=(append or DEFAULT_APPEND) if kernel else None,
                description=description or f"imported from {path}",
                source={"kind": "file", "location": str(Path(path).absolute())},
                created=_now())
            return self._commit(stage, image)
        finally:
            await self._discard(stage)

    # --- pull ----------------------------------------------------------------------

    async def pull(self, name: str, *, url: str | None = None, sha256: str | None = None,
                   progress: Progress | None = None,
                   limits: download.Limits = download.Limits()) -> Image:
        """Download a catalog entry (or ``url``, then ``sha256`` is required) and verify
        its digest before it enters the store, within ``limits`` (deadline, minimum
        rate). Idempotent: an image already in the store is returned as is.
        ``progress(done_bytes, total_bytes | None)`` may be async."""
        check_image_name(name)
        sha256 = _check_sha256(sha256)
        if url is None:
            entry = self.catalog.get(name)
        else:
            if sha256 is None:
                raise errors.BadRequest("sha256 is required to pull from a URL")
            entry = CatalogEntry(name=name, url=_check_url(url), sha256=sha256,
                                 description=f"downloaded from {url}")
        async with self._locked(name):
            if self.exists(name):
                image = self.get(name)
                if url is not None and image.source.get("location") != url:
                    raise errors.Conflict(f"image {name!r} already exists (from "
                                          f"{image.source.get('location')})", image=name)
                return image
            if not entry.downloadable:
                raise errors.ImageError(f"image {name!r} is built from a recipe, not "
                                        f"downloaded: run 'vmctl image build {name}'",
                                        image=name)
            clock = limits.clock()
            if not entry.derived:
                return await self._download_entry(entry, sha256, progress, clock)
            async with self._locked(entry.base):     # derived -> base lock order only
                if not self.exists(entry.base):
                    await self._download_entry(self.catalog.get(entry.base), None, progress,
                                               clock)
                return await self._make_derived(entry)

    async def _make_derived(self, entry: CatalogEntry) -> Image:
        base = self.get(entry.base)
        cloud_config = copy.deepcopy(entry.cloud_config)
        packages = list(cloud_config.get("packages", []))
        packages += [p for p in entry.packages if p not in packages]
        cloud_config["packages"] = packages
        image = dataclasses.replace(
            base, name=entry.name, actual_size=0, description=entry.description,
            source={"kind": "base", "location": base.name, "catalog": entry.name},
            created=_now(), base=base.name, cloud_config=cloud_config)
        stage = self._stage()
        try:
            return self._commit(stage, image)
        finally:
            await self._discard(stage)

    async def _download_entry(self, entry: CatalogEntry, sha256: str | None,
                              progress: Progress | None, clock: download.Clock) -> Image:
        for u in (entry.url, entry.checksum_url, entry.kernel_url, entry.initrd_url):
            if u:
                self.policy.check_url(u)
        stage = self._stage()
        try:
            async with asyncio.timeout(max(0.0, clock.remaining())):
                return await self._download_staged(entry, sha256, progress, clock, stage)
        except TimeoutError:
            raise errors.ImageError(f"the pull of {entry.name} did not finish within its "
                                    f"deadline of {clock.limits.deadline:g}s",
                                    image=entry.name) from None
        finally:
            await self._discard(stage)

    async def _download_staged(self, entry: CatalogEntry, sha256: str | None,
                               progress: Progress | None, clock: download.Clock,
                               stage: Path) -> Image:
        async with self.policy.session(self.timeout) as session:
            sums = (await download.fetch_sums(session, entry.checksum_url, clock)
                    if entry.checksum_url else None)
            part = stage / "disk.part"
            w = await download.download(session, entry.url, part, download.expected(
                entry.url, {"sha256": entry.sha256, "sha512": entry.sha512}, sums,
                entry.checksum_url), progress, clock)
            if sha256 and w.digest("sha256") != sha256:
                raise errors.ImageError(f"sha256 mismatch for {entry.url}: expected "
                                        f"{sha256}, got {w.digest('sha256')}")
            for url, dst, hexd in ((entry.kernel_url, "vmlinuz", entry.kernel_sha256),
                                   (entry.initrd_url, "initrd.img", entry.initrd_sha256)):
                if url:
                    await download.download(
                        session, url, stage / dst,
                        download.expected(url, {"sha256": hexd}, sums,
                                          entry.checksum_url), None, clock)
        info = await self._check_disk(part, entry.format)
        await files.check_disk_file(part, info["format"])
        for what, dst in (("kernel", "vmlinuz"), ("initrd", "initrd.img")):
            if (stage / dst).exists():
                with open(stage / dst, "rb") as f:
                    files.check_content(f.fileno(), what, f"{what} of {entry.name}")
        disk = stage / f"disk.{info['format']}"
        os.rename(part, disk)
        kernel = entry.boot == "kernel" and entry.kernel_url
        image = Image(
            name=entry.name, format=info["format"], path=disk,
            virtual_size=info["virtual-size"], actual_size=info["actual-size"],
            sha256=w.digest("sha256"), boot="kernel" if kernel else "disk",
            kernel=stage / "vmlinuz" if kernel else None,
            initrd=stage / "initrd.img" if kernel and entry.initrd_url else None,
            append=(entry.append or DEFAULT_APPEND) if kernel else None,
            description=entry.description,
            source={"kind": "url", "location": entry.url,
                    **({"catalog": entry.name}
                       if self.catalog.entries.get(entry.name) is entry else {})},
            created=_now())
        return self._commit(stage, image)


    # --- built images (builder.py) ----------------------------------------------------

    async def add_built(self, name: str, disk: Path, extra: dict[str, Path], *,
                        description: str, source: dict[str, Any], replace: bool) -> Image:
        """Move a built qcow2 ``disk`` (on the store's file system) and the ``extra``
        files ``{name in the image dir: path}`` (recipe, build log) into the store;
        with ``replace`` an existing image of that name is swapped out."""
        check_image_name(name)
        async with self._locked(name):
            if self.exists(name) and not replace:
                raise errors.Conflict(f"image {name!r} already exists", image=name)
            stage = self._stage()
            try:
                info = await self._check_disk(disk, "qcow2")
                await files.check_disk_file(disk, "qcow2")
                os.rename(disk, stage / "disk.qcow2")
                got = await asyncio.to_thread(sha256_file, stage / "disk.qcow2")
                for fname, src in extra.items():
                    await asyncio.to_thread(shutil.copyfile, src, stage / fname)
                image = Image(name=name, format="qcow2", path=stage / "disk.qcow2",
                              virtual_size=info["virtual-size"],
                              actual_size=os.path.getsize(stage / "disk.qcow2"),
                              sha256=got, description=description, source=source,
                              created=_now())
                if self.exists(name):
                    trash = self._stage()
                    os.rename(self.root / name, trash / name)
                    await self._discard(trash)
                return self._commit(stage, image)
            finally:
                await self._discard(stage)

    # --- remove --------------------------------------------------------------------

    async def remove(self, name: str, in_use: list[str]) -> None:
        """Delete an image no VM uses and no other image is derived from."""
        async with self._locked(name):
            self.get(name)
            if in_use:
                raise errors.Conflict(f"image {name!r} is used by VM(s): "
                                      f"{', '.join(sorted(in_use))}", vms=sorted(in_use))
            derived = [i.name for i in self.list() if i.base == name]
            if derived:
                raise errors.Conflict(f"image {name!r} is the base of {', '.join(derived)}; "
                                      "remove those first", images=derived)
            trash = self._stage()
            os.rename(self.root / name, trash / name)
            fsync_dir(self.root)
            await self._discard(trash)
