"""Build recipes: the ``[build]`` table of a catalog entry (``share/images/*.toml``).

A recipe says how :mod:`vmagent.builder` bakes a bootable disk from a distribution's
package mirror with debootstrap::

    [build]
    distribution = "debian"            # debian | ubuntu
    suite = "bookworm"
    mirror = "http://deb.debian.org/debian"   # optional: the host's apt mirror
    components = ["main"]              # optional (ubuntu: main, universe)
    kernel = "linux-image-cloud-amd64" # optional, per distribution
    packages = ["cloud-init", "openssh-server"]
    disk_size = "3G"
    commands = ["echo hello >/etc/motd"]        # run in the image with /bin/sh -c
    [[build.files]]
    path = "/etc/skel/.vimrc"
    content = "set mouse=\n"
    mode = "0644"                      # optional

``from = "debian-12"`` inherits another entry's recipe: its settings are the defaults,
``packages``, ``files`` and ``commands`` are appended to the inherited ones. Recipes are
validated (and ``from`` chains resolved) when the catalog loads; the mirror default is
resolved when a build starts (:func:`host_mirror`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vmagent.errors import BadRequest
from vmagent.spec import format_size, parse_size

DISTRIBUTIONS = {
    # distribution: default mirror, components, kernel package, keyring, security suffix
    "debian": {"mirror": "http://deb.debian.org/debian", "components": ["main"],
               "kernel": "linux-image-cloud-amd64",
               "keyring": "/usr/share/keyrings/debian-archive-keyring.gpg",
               "security_mirror": "http://deb.debian.org/debian-security"},
    "ubuntu": {"mirror": "http://archive.ubuntu.com/ubuntu",
               "components": ["main", "universe"], "kernel": "linux-image-virtual",
               "keyring": "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
               "security_mirror": None},     # same mirror, suite-security
}
MIN_DISK, MAX_DISK = 1 << 30, 256 << 30
_KEYS = {"from", "distribution", "suite", "mirror", "security_mirror", "components",
         "kernel", "packages", "files", "commands", "disk_size", "debootstrap_script"}
_PKG = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_SUITE = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
_URL = re.compile(r"^(https?|file)://[^\s'\"]+$")
_COMPONENT = re.compile(r"^[a-z][a-z0-9-]*$")


class RecipeError(BadRequest):
    """A recipe is malformed: the message names the file and the problem."""


@dataclass(frozen=True)
class FileSpec:
    path: str
    content: str
    mode: int = 0o644

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "content": self.content, "mode": f"{self.mode:04o}"}


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe (inheritance applied; ``mirror`` may still be None = host's)."""

    name: str
    distribution: str
    suite: str
    packages: tuple[str, ...]
    disk_size: int
    kernel: str
    components: tuple[str, ...]
    mirror: str | None = None
    security_mirror: str | None = None
    files: tuple[FileSpec, ...] = ()
    commands: tuple[str, ...] = ()
    debootstrap_script: str | None = None
    chain: tuple[str, ...] = ()          # the entries it inherits from, nearest first

    @property
    def keyring(self) -> str:
        return DISTRIBUTIONS[self.distribution]["keyring"]

    @property
    def cache_key(self) -> str:
        return f"{self.distribution}-{self.suite}"

    def all_packages(self) -> list[str]:
        """What apt installs in the image: the kernel, the bootloader, the recipe's."""
        out = [self.kernel, "grub-pc"]
        return out + [p for p in self.packages if p not in out]

    def suites(self) -> list[tuple[str, str]]:
        """(mirror, suite) pairs the image's apt uses: the release, its updates and its
        security suite (Debian: on the security mirror)."""
        mirror = self.mirror or DISTRIBUTIONS[self.distribution]["mirror"]
        security = self.security_mirror or DISTRIBUTIONS[self.distribution][
            "security_mirror"] or mirror
        return [(mirror, self.suite), (mirror, f"{self.suite}-updates"),
                (security, f"{self.suite}-security")]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "suite": self.suite,
                "mirror": self.mirror, "security_mirror": self.security_mirror,
                "components": list(self.components), "kernel": self.kernel,
                "packages": list(self.packages), "disk_size": format_size(self.disk_size),
                "files": [f.to_json() for f in self.files], "commands": list(self.commands),
                "debootstrap_script": self.debootstrap_script, "from": list(self.chain)}


def _fail(file: Path | None, problem: str) -> RecipeError:
    where = f"recipe in {file}" if file else "recipe"
    return RecipeError(f"{where}: {problem}", file=str(file) if file else None)


def _str(file: Path | None, table: dict, key: str, pattern: re.Pattern | None = None,
         what: str = "") -> str | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
        raise _fail(file, f"build.{key} must be {what or 'a string'}, got {value!r}")
    return value


def _str_list(file: Path | None, table: dict, key: str, pattern: re.Pattern | None,
              what: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise _fail(file, f"build.{key} must be a list of {what}")
    for item in value:
        if not isinstance(item, str) or (pattern is not None and not pattern.match(item)):
            raise _fail(file, f"build.{key}: {item!r} is not a {what.rstrip('s')}")
    return value


def _files(file: Path | None, table: dict) -> list[FileSpec]:
    value = table.get("files", [])
    if not isinstance(value, list):
        raise _fail(file, "build.files must be an array of tables ([[build.files]])")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _fail(file, f"build.files[{i}] must be a table with path and content")
        unknown = sorted(set(item) - {"path", "content", "mode"})
        if unknown:
            raise _fail(file, f"build.files[{i}]: unknown key(s): {', '.join(unknown)}")
        path, content = item.get("path"), item.get("content")
        if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/") \
                or path.rstrip("/") == "":
            raise _fail(file, f"build.files[{i}].path must be an absolute path inside the "
                        f"image without '..', got {path!r}")
        if not isinstance(content, str):
            raise _fail(file, f"build.files[{i}].content must be a string")
        mode = item.get("mode", "0644")
        if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3,4}", mode):
            raise _fail(file, f"build.files[{i}].mode must be an octal string such as "
                        f"\"0644\", got {mode!r}")
        out.append(FileSpec(path, content, int(mode, 8)))
    return out


def check_table(file: Path | None, table: Any) -> dict[str, Any]:
    """Validate one ``[build]`` table on its own (types, names, sizes); return it
    normalized. Inheritance is resolved by :func:`resolve`."""
    if not isinstance(table, dict):
        raise _fail(file, "build must be a table ([build])")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise _fail(file, f"unknown key(s) in [build]: {', '.join(unknown)}")
    out: dict[str, Any] = {}
    out["from"] = _str(file, table, "from")
    dist = _str(file, table, "distribution")
    if dist is not None and dist not in DISTRIBUTIONS:
        raise _fail(file, f"build.distribution must be one of "
                    f"{', '.join(sorted(DISTRIBUTIONS))}, got {dist!r}")
    out["distribution"] = dist
    out["suite"] = _str(file, table, "suite", _SUITE, "a suite name such as 'bookworm'")
    for key in ("mirror", "security_mirror"):
        value = _str(file, table, key, _URL, "an http(s) URL")
        out[key] = value.rstrip("/") if value else value
    out["kernel"] = _str(file, table, "kernel", _PKG, "a package name")
    out["debootstrap_script"] = _str(file, table, "debootstrap_script", _SUITE,
                                     "a debootstrap script name such as 'gutsy'")
    out["components"] = _str_list(file, table, "components", _COMPONENT, "components") \
        if "components" in table else None
    if out["components"] == []:
        raise _fail(file, "build.components must not be empty")
    out["packages"] = _str_list(file, table, "packages", _PKG, "package names")
    out["commands"] = _str_list(file, table, "commands", None, "commands")
    if any(not c.strip() for c in out["commands"]):
        raise _fail(file, "build.commands: a command is empty")
    out["files"] = _files(file, table)
    out["disk_size"] = None
    if "disk_size" in table:
        try:
            size = parse_size(table["disk_size"], "build.disk_size")
        except BadRequest as exc:
            raise _fail(file, exc.message) from None
        if not MIN_DISK <= size <= MAX_DISK:
            raise _fail(file, f"build.disk_size {format_size(size)} is out of range "
                        f"({format_size(MIN_DISK)}..{format_size(MAX_DISK)})")
        out["disk_size"] = size
    return out


def resolve(name: str, tables: dict[str, dict[str, Any]],
            files: dict[str, Path | None] | None = None) -> Recipe:
    """The recipe of entry ``name``: its checked table (see :func:`check_table`) with the
    tables it inherits from (``from``) applied underneath. ``tables`` maps entry names
    to checked tables; ``files`` names their files for error messages."""
    files = files or {}
    chain, seen, current = [], {name}, tables[name]
    while current.get("from"):
        parent = current["from"]
        if parent in seen:
            raise _fail(files.get(name), f"build.from forms a cycle: "
                        f"{' -> '.join([name, *chain, parent])}")
        if parent not in tables:
            raise _fail(files.get(name), f"build.from {parent!r} is not an entry with a "
                        "[build] recipe")
        chain.append(parent)
        seen.add(parent)
        current = tables[parent]
    merged: dict[str, Any] = {"packages": [], "commands": [], "files": []}
    for entry in [*reversed(chain), name]:       # the farthest ancestor first
        t = tables[entry]
        for key in ("distribution", "suite", "mirror", "security_mirror", "kernel",
                    "components", "disk_size", "debootstrap_script"):
            if t.get(key) is not None:
                merged[key] = t[key]
        merged["packages"] += [p for p in t["packages"] if p not in merged["packages"]]
        merged["commands"] += t["commands"]
        merged["files"] += t["files"]
    file = files.get(name)
    for key in ("distribution", "suite", "disk_size"):
        if merged.get(key) is None:
            raise _fail(file, f"build.{key} is required (here or in the recipe it "
                        "inherits with 'from')")
    if not merged["packages"]:
        raise _fail(file, "build.packages must list at least one package")
    defaults = DISTRIBUTIONS[merged["distribution"]]
    return Recipe(
        name=name, distribution=merged["distribution"], suite=merged["suite"],
        packages=tuple(merged["packages"]), disk_size=merged["disk_size"],
        kernel=merged.get("kernel") or defaults["kernel"],
        components=tuple(merged.get("components") or defaults["components"]),
        mirror=merged.get("mirror"), security_mirror=merged.get("security_mirror"),
        files=tuple(merged["files"]), commands=tuple(merged["commands"]),
        debootstrap_script=merged.get("debootstrap_script"), chain=tuple(chain))


# --- the host's apt sources ------------------------------------------------------------

def apt_sources(root: Path = Path("/")) -> list[tuple[str, list[str]]]:
    """``(uri, suites)`` of the host's apt sources (deb822 ``*.sources`` files and
    one-line ``sources.list`` files), in the order apt reads them."""
    etc = root / "etc/apt"
    out: list[tuple[str, list[str]]] = []
    one_line = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for f in one_line:
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                out.append((words[1].rstrip("/"), [words[2]]))
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        try:
            text = f.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "deb").split() or \
                    fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                out.append((uri.rstrip("/"), fields.get("suites", "").split()))
    return out


def host_mirror(recipe: Recipe, root: Path = Path("/")) -> Recipe:
    """``recipe`` with its mirrors filled in: the recipe's own, else the host's apt
    source for the recipe's suite (and its security suite), else the distribution's
    public default."""
    sources = apt_sources(root)
    mirror = recipe.mirror or next(
        (uri for uri, suites in sources if recipe.suite in suites), None) \
        or DISTRIBUTIONS[recipe.distribution]["mirror"]
    security = recipe.security_mirror or next(
        (uri for uri, suites in sources if f"{recipe.suite}-security" in suites
         and uri != mirror), None)
    return replace(recipe, mirror=mirror, security_mirror=security)
