"""Build a catalog image on this host, without an agent, into a directory, cached by its
inputs: ``vmagent build-image NAME DIR`` (``scripts/build-test-image`` builds the ``test``
recipe this way for the test suite, the benchmarks and CI).

The directory gets the builder's disk (``NAME.qcow2``, or ``disk_name``: a compressed
qcow2 with a partition table and GRUB, so it boots from its own disk), ``vmlinuz`` and
``initrd.img`` (the image's own kernel and initrd, for ``-kernel``/``-initrd`` with
``append``: the root file system by its label), ``build.log``, ``SHA256SUMS`` and
``build.json``: the key of the inputs and the digests of the files, written last, so it
says the directory is complete.

The inputs are what decides the disk's contents: the recipe with the mirrors the build
uses (the host's apt sources unless the recipe names its own) and the code of the builder
(``builder.py``, ``aptindex.py``). Not its name, the catalog's other entries or where the
output goes. A run whose inputs match ``build.json`` (and whose files still match their
digests) builds nothing and takes seconds; anything else rebuilds, reusing the builder's
cache (the debootstrap tarball and the downloaded packages) in ``cache_dir``. Packages
updated on the mirror do not make a rebuild; ``force`` does.

One build into a directory at a time (an flock on ``DIR/.lock``); the files are replaced
by renames, so a reader sees the old or the new file. SIGINT and SIGTERM cancel a build:
the running command is killed and the mounts and loop devices are released.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from vmagent.fsutil import atomic_write, atomic_write_json, sha256_file
from vmagent.images.build import aptindex, builder
from vmagent.images.build.recipes import Recipe, host_mirror
from vmagent.images.catalog import DEFAULT_APPEND

FORMAT = 1                         # the layout of the output directory
# the code that decides what goes into the disk
CODE = [Path(builder.__file__), Path(aptindex.__file__)]
STAMP = "build.json"
DEFAULT_CACHE = Path("/var/cache/vmagent-build")


class BuildError(Exception):
    """The build could not run or failed; the message says why (and where the log is)."""


@dataclass(frozen=True)
class Result:
    directory: Path
    disk: Path
    kernel: Path
    initrd: Path
    append: str
    key: str
    built: bool                    # False: the inputs were unchanged, nothing was built
    seconds: float


def inputs(recipe: Recipe) -> dict[str, Any]:
    """What the image is made from (``recipe`` with its mirrors resolved)."""
    doc = recipe.to_json()
    for key in ("name", "from"):          # the recipe's merged content says it all
        doc.pop(key)
    doc["suites"] = [list(s) for s in recipe.suites()]
    code = hashlib.sha256()
    for path in CODE:
        code.update(path.read_bytes())
    return {"format": FORMAT, "recipe": doc, "builder": code.hexdigest()}


def input_key(recipe: Recipe) -> str:
    text = json.dumps(inputs(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def cached(out: Path, key: str, disk_name: str) -> dict[str, Any] | None:
    """The ``build.json`` of a complete build of ``key`` in ``out``, else None."""
    try:
        doc = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    files = doc.get("sha256")
    if doc.get("key") != key or doc.get("disk") != disk_name or not isinstance(files, dict) \
            or set(files) != {disk_name, "vmlinuz", "initrd.img"}:
        return None
    try:
        if any(sha256_file(out / name) != digest for name, digest in files.items()):
            return None
    except OSError:
        return None
    return doc


@contextlib.contextmanager
def _locked(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for the other build into {path.parent}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _cancel_on_signals(log: builder.Log) -> Iterator[None]:
    """SIGINT/SIGTERM cancel the build (the builder then releases its mounts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, lambda *_: log.cancel()) for s in (signal.SIGINT,
                                                                    signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _check_disk_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or name in (
            STAMP, "vmlinuz", "initrd.img", "SHA256SUMS", "build.log"):
        raise BuildError(f"the disk's file name {name!r} must be a plain file name, not "
                         "hidden and not one of the other files")
    return name


def _result(out: Path, doc: dict[str, Any], built: bool, seconds: float) -> Result:
    return Result(directory=out, disk=out / doc["disk"], kernel=out / "vmlinuz",
                  initrd=out / "initrd.img", append=doc["append"], key=doc["key"],
                  built=built, seconds=seconds)


def build(recipe: Recipe, out: Path, cache_dir: Path = DEFAULT_CACHE, *,
          disk_name: str | None = None, force: bool = False,
          say: Callable[[str], None] = lambda line: None,
          make: Callable[..., builder.Builder] | None = None) -> Result:
    """Build ``recipe`` into ``out`` unless ``out`` holds a build of the same inputs.
    ``say`` gets progress lines; ``make`` makes the builder (tests replace it)."""
    t0 = time.monotonic()
    if recipe.mirror is None:
        recipe = host_mirror(recipe)
    disk_name = _check_disk_name(disk_name or f"{recipe.name}.qcow2")
    key = input_key(recipe)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".lock", say):
        doc = None if force else cached(out, key, disk_name)
        if doc is not None:
            return _result(out, doc, False, time.monotonic() - t0)
        if os.geteuid() != 0:
            raise BuildError(f"{out} holds no build of these inputs, and building an image "
                             "needs root (loop devices, mount, chroot)")
        (out / STAMP).unlink(missing_ok=True)
        work = out / ".work"
        if work.exists():                      # a build that was killed
            stale = builder.Log(out / "build.log")
            try:
                builder.release_stale(work, stale)
            finally:
                stale.close()
            if builder.mounts_under(work):
                raise BuildError(f"mounts remain under {work} from an earlier build "
                                 "(see build.log); unmount them first")
            shutil.rmtree(work)
        work.mkdir()
        log = builder.Log(work / "build.log")
        say(f"building {recipe.name} ({recipe.distribution} {recipe.suite} from "
            f"{recipe.mirror}) into {out}; log: {out / 'build.log'}")
        step_started = [time.monotonic(), ""]

        def on_step(step: str) -> None:
            if step_started[1]:
                say(f"  {step_started[1]}: {time.monotonic() - step_started[0]:.0f} s")
            step_started[:] = [time.monotonic(), step]

        failed = True
        try:
            b = (make or builder.Builder)(recipe, work, Path(cache_dir), log, on_step,
                                          boot_files=work / "boot")
            with _cancel_on_signals(log):
                disk = b.run()
            on_step("")
            log.write(f"\n== done in {time.monotonic() - t0:.0f}s\n")
            failed = False
        except builder.StepFailed as exc:
            log.write(f"\n== FAILED at step {exc.step}: {exc.message}\n")
            raise BuildError(f"the build of {recipe.name} failed at step {exc.step}: "
                             f"{exc.message}\n{log.tail(25)}\n(the whole log: "
                             f"{out / 'build.log'})") from None
        finally:
            log.close()
            os.replace(work / "build.log", out / "build.log")
            if failed and not builder.mounts_under(work):
                shutil.rmtree(work, ignore_errors=True)
        files = {disk_name: disk, "vmlinuz": work / "boot/vmlinuz",
                 "initrd.img": work / "boot/initrd.img"}
        digests = {name: sha256_file(path) for name, path in files.items()}
        for name, path in files.items():
            os.chmod(path, 0o644)
            os.replace(path, out / name)
        shutil.rmtree(work, ignore_errors=True)
        atomic_write(out / "SHA256SUMS", "".join(
            f"{digests[n]}  {n}\n" for n in sorted(digests)).encode())
        doc = {"key": key, "image": recipe.name, "disk": disk_name, "append": DEFAULT_APPEND,
               "sha256": digests, "inputs": inputs(recipe),
               "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "build_seconds": round(time.monotonic() - t0, 1)}
        atomic_write_json(out / STAMP, doc)
        return _result(out, doc, True, time.monotonic() - t0)


def command(image: str, directory: str, *, catalog_dir: str | None, cache_dir: str,
            disk_name: str | None, force: bool) -> int:
    """``vmagent build-image``: exit 0 when the directory holds the image, 2 for bad
    input, 1 when the build fails."""
    from vmagent.errors import VMAgentError
    from vmagent.images.catalog import Catalog, default_catalog_dir

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    try:
        if disk_name is not None:
            _check_disk_name(disk_name)
        entry = Catalog.load(catalog_dir or default_catalog_dir()).get(image)
        if entry.recipe is None:
            raise BuildError(f"image {image!r} has no [build] recipe in the catalog "
                             f"({entry.file}); it can only be pulled")
    except (VMAgentError, BuildError) as exc:
        print(f"vmagent build-image: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    try:
        res = build(entry.recipe, Path(directory), Path(cache_dir), disk_name=disk_name,
                    force=force, say=say)
    except (BuildError, OSError) as exc:
        print(f"vmagent build-image: {exc}", file=sys.stderr)
        return 1
    print(f"{image}: {'built' if res.built else 'up to date (inputs unchanged)'} in "
          f"{res.seconds:.1f} s\n  disk    {res.disk}\n  kernel  {res.kernel}\n"
          f"  initrd  {res.initrd}\n  append  {res.append}")
    return 0
