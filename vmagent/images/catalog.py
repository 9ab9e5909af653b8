"""The image catalog: one TOML file per image in ``share/images/``.

An entry either downloads a disk (``url`` + ``format`` + a digest: ``sha256``, ``sha512`` or
``checksum_url``, the URL of a published SHA256SUMS/SHA512SUMS file in which the digest of
the file named by ``url`` is looked up at pull time), or is *derived* from another entry
(``base``) and only adds ``packages`` / ``cloud_config`` that cloud-init applies on first
boot. Entries with ``boot = "kernel"`` also name ``kernel_url``/``initrd_url``/``append``.
An entry may also (or only) carry a ``[build]`` recipe (:mod:`vmagent.recipes`): the
image builder bakes its disk from the distribution's package mirror.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmagent import errors

from vmagent.images.build import recipes
from vmagent.images.build.builder import ROOT_LABEL
from vmagent.spec import IMAGE_NAME_RE

FORMATS = ("qcow2", "raw")
BOOTS = ("disk", "kernel")
# the kernel command line of an image booted with -kernel/-initrd that names none: the
# root file system by its label (what the image builder makes), so the same line boots a
# partitioned disk and a bare file system; the initrd resolves the label. no_timer_check:
# under TCG on a loaded host the kernel's IO-APIC timer check can fail and panic the boot
# ("IO-APIC + timer doesn't work!", seen with six guests booting on two cores)
DEFAULT_APPEND = f"root=LABEL={ROOT_LABEL} console=ttyS0 rw no_timer_check"
_HEX = {"sha256": re.compile(r"^[0-9a-f]{64}$"), "sha512": re.compile(r"^[0-9a-f]{128}$")}
_STR_KEYS = ("name", "description", "url", "format", "boot", "kernel_url", "initrd_url",
             "append", "sha256", "sha512", "checksum_url", "kernel_sha256",
             "initrd_sha256", "base")
_KEYS = frozenset(_STR_KEYS) | {"packages", "cloud_config", "build"}


class CatalogError(errors.InternalError):
    """A catalog file is malformed (a configuration problem of the host)."""


@dataclass(frozen=True)
class CatalogEntry:
    """One image the agent knows how to obtain. ``derived`` entries have ``base`` set."""

    name: str
    description: str = ""
    url: str | None = None
    format: str | None = None
    boot: str = "disk"
    kernel_url: str | None = None
    initrd_url: str | None = None
    append: str | None = None
    sha256: str | None = None
    sha512: str | None = None
    checksum_url: str | None = None
    kernel_sha256: str | None = None
    initrd_sha256: str | None = None
    base: str | None = None
    packages: tuple[str, ...] = ()
    cloud_config: dict[str, Any] = field(default_factory=dict)
    file: Path | None = None
    build: dict[str, Any] | None = None      # the checked [build] table
    recipe: recipes.Recipe | None = None     # resolved when the catalog loads

    @property
    def derived(self) -> bool:
        return self.base is not None

    @property
    def downloadable(self) -> bool:
        return self.url is not None or self.derived

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _STR_KEYS if getattr(self, k) is not None}
        if self.derived:
            out.pop("boot", None)  # the base decides how it boots
            out["packages"] = list(self.packages)
            if self.cloud_config:
                out["cloud_config"] = self.cloud_config
        if not self.downloadable:
            out.pop("boot", None)
        if self.recipe is not None:
            out["build"] = self.recipe.to_json()
        return out


def _fail(file: Path, problem: str) -> CatalogError:
    return CatalogError(f"catalog file {file}: {problem}", file=str(file))


def _http_url(file: Path, key: str, value: str) -> None:
    if not re.match(r"^https?://[^/\s]+/\S*$", value):
        raise _fail(file, f"{key} must be an http(s) URL, got {value!r}")


def parse_entry(file: Path, data: dict[str, Any]) -> CatalogEntry:
    """Validate one parsed TOML document; every error names ``file`` and the problem."""
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise _fail(file, f"unknown key(s): {', '.join(unknown)}")
    for key in _STR_KEYS:
        if key in data and not isinstance(data[key], str):
            raise _fail(file, f"{key} must be a string, got {type(data[key]).__name__}")
    name = data.get("name")
    if not name:
        raise _fail(file, "missing required field 'name'")
    if not IMAGE_NAME_RE.match(name):
        raise _fail(file, f"name {name!r} is not a valid image name")
    if name != file.stem:
        raise _fail(file, f"name {name!r} does not match the file name {file.name!r}")
    build = None
    if "build" in data:
        try:
            build = recipes.check_table(file, data.pop("build"))
        except recipes.RecipeError as exc:
            raise CatalogError(exc.message, file=str(file)) from None
        if "base" in data:
            raise _fail(file, "an entry with a [build] recipe cannot also have 'base' "
                        "(inherit a recipe with build.from)")
        if "url" not in data:
            stray = sorted(set(data) - {"name", "description"})
            if stray:
                raise _fail(file, f"{', '.join(stray)} only apply to a downloaded image "
                            "(with url); a built image takes them from its recipe")
            return CatalogEntry(name=name, description=data.get("description", ""),
                                file=file, build=build)
    if "base" in data:
        return _parse_derived(file, name, data)
    for key in ("url", "format"):
        if key not in data:
            raise _fail(file, f"missing required field {key!r} (or 'base' for a derived "
                        "image, or a [build] recipe)")
    for key in ("packages", "cloud_config"):
        if key in data:
            raise _fail(file, f"{key!r} is only allowed in a derived image (with 'base')")
    _http_url(file, "url", data["url"])
    if data["format"] not in FORMATS:
        raise _fail(file, f"format must be one of {', '.join(FORMATS)}, got {data['format']!r}")
    digests = [k for k in ("sha256", "sha512", "checksum_url") if k in data]
    if len(digests) != 1:
        raise _fail(file, "exactly one of sha256, sha512 or checksum_url is required"
                    + (f" (got {', '.join(digests)})" if digests else ""))
    for key in ("sha256", "sha512", "kernel_sha256", "initrd_sha256"):
        if key in data:
            data[key] = data[key].lower()
            if not _HEX[key.rsplit("_", 1)[-1]].match(data[key]):
                raise _fail(file, f"{key} is not a hex {key.rsplit('_', 1)[-1]} digest")
    if "checksum_url" in data:
        _http_url(file, "checksum_url", data["checksum_url"])
    boot = data.get("boot", "disk")
    if boot not in BOOTS:
        raise _fail(file, f"boot must be 'disk' or 'kernel', got {boot!r}")
    if boot == "kernel":
        if "kernel_url" not in data:
            raise _fail(file, "boot = 'kernel' needs kernel_url")
        for key in ("kernel", "initrd"):
            if f"{key}_url" in data:
                _http_url(file, f"{key}_url", data[f"{key}_url"])
                if f"{key}_sha256" not in data and "checksum_url" not in data:
                    raise _fail(file, f"{key}_url needs {key}_sha256 or checksum_url")
    else:
        stray = [k for k in ("kernel_url", "initrd_url", "append", "kernel_sha256",
                             "initrd_sha256") if k in data]
        if stray:
            raise _fail(file, f"{', '.join(stray)} only apply to boot = 'kernel'")
    fields = {k: data[k] for k in _STR_KEYS if k in data}
    if boot == "kernel":
        fields.setdefault("append", DEFAULT_APPEND)
    return CatalogEntry(**fields, file=file, build=build)


def _parse_derived(file: Path, name: str, data: dict[str, Any]) -> CatalogEntry:
    stray = sorted(set(data) & {"url", "format", "boot", "sha256", "sha512", "checksum_url",
                                "kernel_url", "initrd_url", "append", "kernel_sha256",
                                "initrd_sha256"})
    if stray:
        raise _fail(file, f"a derived image (with 'base') takes its disk from the base; "
                    f"remove {', '.join(stray)}")
    packages = data.get("packages", [])
    if not isinstance(packages, list) or not all(
            isinstance(p, str) and re.match(r"^[a-z0-9][a-z0-9+.:-]*$", p) for p in packages):
        raise _fail(file, "packages must be a list of package names")
    cloud_config = data.get("cloud_config", {})
    if not isinstance(cloud_config, dict):
        raise _fail(file, "cloud_config must be a table")
    if not isinstance(cloud_config.get("packages", []), list):
        raise _fail(file, "cloud_config.packages must be a list (it is merged with packages)")
    if not packages and not cloud_config:
        raise _fail(file, "a derived image needs packages or cloud_config")
    return CatalogEntry(name=name, description=data.get("description", ""),
                        base=data["base"], packages=tuple(packages),
                        cloud_config=dict(cloud_config), file=file)


@dataclass
class Catalog:
    """The entries of a catalog directory, by name."""

    entries: dict[str, CatalogEntry] = field(default_factory=dict)
    directory: Path | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Catalog":
        """Read and validate every ``*.toml`` in ``directory``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CatalogError(f"catalog directory {directory} does not exist")
        entries: dict[str, CatalogEntry] = {}
        for file in sorted(directory.glob("*.toml")):
            try:
                with open(file, "rb") as f:
                    data = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise _fail(file, f"invalid TOML: {exc}") from None
            except UnicodeDecodeError as exc:
                raise _fail(file, f"invalid TOML: not UTF-8 ({exc.reason} at byte "
                            f"{exc.start})") from None
            except OSError as exc:
                raise _fail(file, f"cannot read: {exc.strerror}") from None
            entry = parse_entry(file, data)
            entries[entry.name] = entry
        for entry in entries.values():
            if entry.derived:
                base = entries.get(entry.base)
                if base is None:
                    raise _fail(entry.file, f"base {entry.base!r} is not in the catalog")
                if base.derived:
                    raise _fail(entry.file, f"base {entry.base!r} is itself derived; "
                                "derive from an image with a disk")
        tables = {n: e.build for n, e in entries.items() if e.build is not None}
        files = {n: entries[n].file for n in tables}
        for n in tables:
            try:
                entries[n] = replace(entries[n], recipe=recipes.resolve(n, tables, files))
            except recipes.RecipeError as exc:
                raise CatalogError(exc.message, file=str(files[n])) from None
        return cls(entries=entries, directory=directory)

    def get(self, name: str) -> CatalogEntry:
        try:
            return self.entries[name]
        except KeyError:
            available = ", ".join(sorted(self.entries)) or "none"
            raise errors.NotFound(f"image {name!r} is not in the catalog "
                                  f"(available: {available})", image=name) from None

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries


def default_catalog_dir() -> Path:
    """The first existing of ``$VMAGENT_CATALOG``, the source tree's ``share/images`` and
    ``<sys.prefix>/share/vmagent/images`` (the last one if none exists)."""
    candidates = []
    if os.environ.get("VMAGENT_CATALOG"):
        candidates.append(Path(os.environ["VMAGENT_CATALOG"]))
    candidates.append(Path(__file__).resolve().parents[2] / "share" / "images")
    candidates.append(Path(sys.prefix) / "share" / "vmagent" / "images")
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[-1]
