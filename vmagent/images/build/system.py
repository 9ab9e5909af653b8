"""Primitives of the image builder: the build log, commands whose output goes to it,
and the loop devices and mounts of a build, released whatever happens."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

from vmagent.fsutil import tail_lines

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "HOME": "/root",
       "DEBIAN_FRONTEND": "noninteractive", "DEBCONF_NONINTERACTIVE_SEEN": "true"}


class StepFailed(Exception):
    """A build step failed: ``step`` names it; the log has the details."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.message = message


class Log:
    """The build log: a file every command's output goes to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "ab", buffering=0)
        self.proc: subprocess.Popen | None = None    # the command running now
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the build: kill the running command; no further step starts."""
        self.cancelled = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def write(self, text: str) -> None:
        self.f.write(text.encode())

    def close(self) -> None:
        self.f.close()

    def tail(self, lines: int = 40) -> str:
        return tail(self.path, lines)


def tail(path: Path, lines: int = 40) -> str:
    return tail_lines(path, lines)


def run(log: Log, argv: list[str], *, nice: bool = False, timeout: float = 3600,
        stdin: str | None = None, capture: bool = False) -> str:
    """Run a command, its output going to the log as it comes (``capture``: also
    returned); raise CalledProcessError on a non-zero exit."""
    log.write(f"$ {shlex.join(argv)}\n")
    if nice:
        argv = ["nice", "-n", "10", *argv]
    t0 = time.monotonic()
    with subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None
                          else subprocess.DEVNULL,
                          stdout=subprocess.PIPE if capture else log.f,
                          stderr=subprocess.STDOUT, env=ENV) as proc:
        log.proc = proc
        try:
            data, _ = proc.communicate(stdin.encode() if stdin is not None else None,
                                       timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        finally:
            log.proc = None
    out = (data or b"").decode("utf-8", "replace")
    if capture:
        log.write(out + ("" if not out or out.endswith("\n") else "\n"))
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv, out)
    log.write(f"# {time.monotonic() - t0:.1f}s\n")
    return out


class Mounts:
    """Loop devices and mounts of one build, released in reverse order by
    :meth:`release` (idempotent, keeps going past errors, logs what it did)."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.loops: list[str] = []
        self.root: Path | None = None       # unmounted recursively

    def loop(self, image: Path, offset: int = 0, size: int | None = None) -> str:
        argv = ["losetup", "--find", "--show"]
        if offset:
            argv += ["--offset", str(offset)]
        if size:
            argv += ["--sizelimit", str(size)]
        dev = run(self.log, [*argv, str(image)], capture=True).strip()
        self.loops.append(dev)
        return dev

    def mount(self, argv: list[str], target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        run(self.log, ["mount", *argv, str(target)])

    def release(self) -> list[str]:
        problems = []
        if self.root is not None and os.path.ismount(self.root):
            for attempt in range(5):
                try:
                    run(self.log, ["umount", "--recursive", str(self.root)])
                    break
                except subprocess.CalledProcessError:
                    if attempt == 4:
                        try:
                            run(self.log, ["umount", "--recursive", "--lazy",
                                           str(self.root)])
                        except subprocess.CalledProcessError:
                            problems.append(f"umount {self.root} failed (see the log)")
                    time.sleep(1)
        for dev in reversed(self.loops):
            try:
                run(self.log, ["losetup", "--detach", dev])
            except subprocess.CalledProcessError:
                problems.append(f"losetup -d {dev} failed (see the log)")
        self.loops.clear()
        return problems


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    prefix = str(Path(path).resolve())
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                out.append(point)
    return out


def release_stale(work: Path, log: Log) -> None:
    """Undo what a build that died (agent killed) left in ``work``: mounts under it
    and loop devices backed by its disk file."""
    m = Mounts(log)
    m.root = work / "root"
    disk = work / "disk.raw"
    if disk.exists():
        out = subprocess.run(["losetup", "--associated", str(disk), "--noheadings",
                              "--output", "NAME"], capture_output=True, text=True).stdout
        m.loops = out.split()
    m.release()
