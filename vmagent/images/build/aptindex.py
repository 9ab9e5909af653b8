"""Resolve a recipe's packages against its mirror's package lists, without a chroot.

A private apt configuration (its own sources.list, lists directory and an *empty* dpkg
status, i.e. a system with nothing installed) downloads the mirror's indexes and asks
``apt-get --simulate install`` what installing the recipe's packages would take. A
package that does not exist, or whose dependencies cannot be met, fails here in seconds
instead of minutes into a build. The lists directory is kept (``workdir``), so a second
resolve only revalidates the indexes.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from vmagent.images.build.recipes import Recipe

_INST = re.compile(r"^Inst (\S+) ")


class ResolveError(Exception):
    """apt could not resolve the packages; ``output`` is what it said."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


def sources_list(recipe: Recipe, keyring: str | None = None) -> str:
    """One-line apt sources for the recipe's mirrors (mirror must be resolved)."""
    signed = f" [signed-by={keyring or recipe.keyring}]"
    comps = " ".join(recipe.components)
    return "".join(f"deb{signed} {mirror} {suite} {comps}\n"
                   for mirror, suite in recipe.suites())


def apt_options(workdir: Path) -> list[str]:
    """``-o`` options that point apt at ``workdir`` and nothing of the host's state."""
    opts = {
        "Dir::Etc::SourceList": workdir / "sources.list",
        "Dir::Etc::SourceParts": workdir / "sources.list.d",
        "Dir::Etc::Preferences": workdir / "preferences",
        "Dir::Etc::PreferencesParts": workdir / "preferences.d",
        "Dir::State::Lists": workdir / "lists",
        "Dir::State::status": workdir / "status",
        "Dir::State::extended_states": workdir / "extended_states",
        "Dir::Cache": workdir / "cache",
        # hosts (and container images) often set these empty: then every call would
        # rebuild the package cache from the lists
        "Dir::Cache::pkgcache": workdir / "cache/pkgcache.bin",
        "Dir::Cache::srcpkgcache": workdir / "cache/srcpkgcache.bin",
        "APT::Architecture": "amd64",
        "APT::Architectures": "amd64",
        "Acquire::Languages": "none",
        "APT::Install-Recommends": "false",
        "Debug::NoLocking": "true",
    }
    out = []
    for key, value in opts.items():
        out += ["-o", f"{key}={value}"]
    return out


def prepare(recipe: Recipe, workdir: Path) -> None:
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d",
                "preferences.d"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    (workdir / "sources.list").write_text(sources_list(recipe))
    if not (workdir / "status").exists():
        (workdir / "status").write_text("")


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C",
           "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def update(recipe: Recipe, workdir: Path, timeout: float = 600) -> str:
    """Download (or revalidate) the mirror's indexes into ``workdir``; apt's output."""
    if not Path(recipe.keyring).is_file():
        raise ResolveError(f"the {recipe.distribution} archive keyring "
                           f"{recipe.keyring} is not installed on this host", "")
    prepare(recipe, workdir)
    res = _run(["apt-get", *apt_options(workdir), "update"], timeout)
    out = res.stdout + res.stderr
    # apt-get update exits 0 on some fetch failures; "W:"/"E:" lines say which
    failed = [ln for ln in out.splitlines() if ln.startswith(("E:", "W: Failed", "Err:"))]
    if res.returncode != 0 or failed:
        raise ResolveError(f"apt-get update against {recipe.mirror} failed: "
                           f"{(failed or out.strip().splitlines() or ['?'])[-1]}", out)
    return out


def simulate(recipe: Recipe, workdir: Path, timeout: float = 300) -> list[str]:
    """The packages ``apt-get install`` would install on an empty system (after
    :func:`update`): the recipe's, the kernel, the bootloader and all they depend on."""
    res = _run(["apt-get", *apt_options(workdir), "--simulate", "install",
                *recipe.all_packages()], timeout)
    out = res.stdout + res.stderr
    if res.returncode != 0:
        errors = [ln for ln in out.splitlines()
                  if ln.startswith("E:") or "but it is not" in ln or "has no installation"
                  in ln or ln.startswith(" ") and "Depends:" in ln]
        raise ResolveError(f"the packages of {recipe.name} do not resolve against "
                           f"{recipe.mirror}: " + "; ".join(e.strip() for e in errors[:6]),
                           out)
    return [m.group(1) for ln in out.splitlines() if (m := _INST.match(ln))]


def resolve(recipe: Recipe, workdir: Path) -> list[str]:
    """:func:`update` then :func:`simulate`."""
    os.makedirs(workdir, exist_ok=True)
    update(recipe, workdir)
    return simulate(recipe, workdir)
