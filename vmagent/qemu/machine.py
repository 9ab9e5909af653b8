"""One qemu process: launch (daemonized, from its run dir), find, signal, wait.

Modelled on QEMU's ``QEMUMachine``: the argv is a list computed elsewhere (argv.py);
``launch()`` runs it and raises :class:`VMLaunchFailure` with the exit code, the command
and everything qemu printed; ``kill()`` and ``wait_gone()`` end it. The pid is read from
the pidfile qemu writes, and trusted only if ``/proc/PID/cmdline`` is this run dir's qemu
(pids are reused).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from vmagent import rundir
from vmagent.errors import Timeout, VMLaunchFailure
from vmagent.poll import poll_until
from vmagent.qemu import argv as qargv

LAUNCH_TIMEOUT = 120.0


def read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0") if a]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], starttime [19])."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def _is_zombie(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is None or fields[0] == "Z"


def _running(pid: int, starttime: str) -> bool:
    """The process that had this pid and start time still has a live thread. (A killed
    multi-threaded process shows its leader as a zombie while its other threads still
    exit, holding its files and the disk image locks.)"""
    fields = _proc_stat(pid)
    if fields is None or fields[19] != starttime:
        return False
    if fields[0] != "Z":
        return True
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


class Machine:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        # the run dir the running qemu was started in, when the VM's directory was
        # renamed since (a pool member handed over under its final name)
        self.launched_in: Path | None = None
        self._seen: tuple[int, str] | None = None   # (pid, starttime) of our qemu

    @property
    def pidfile(self) -> Path:
        return self.run_dir / rundir.PIDFILE

    def pid(self) -> int | None:
        """The pid of this VM's running qemu, or None. Checks the command line; once
        checked, the same process (pid and start time, one read of ``/proc/PID/stat``:
        the monitor asks every second) is taken as it is."""
        if self._seen is not None:
            seen, start = self._seen
            fields = _proc_stat(seen)
            if fields is not None and fields[19] == start and fields[0] != "Z":
                return seen
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid <= 1 or _is_zombie(pid):
            return None
        if not qargv.owns_cmdline(read_cmdline(pid), self.launched_in or self.run_dir):
            return None
        fields = _proc_stat(pid)
        if fields is not None:
            self._seen = (pid, fields[19])
        return pid

    def alive(self) -> bool:
        return self.pid() is not None

    async def launch(self, argv: list[str], timeout: float = LAUNCH_TIMEOUT,
                     prefix: list[str] = ()) -> int:
        """Start qemu (it daemonizes once its devices are set up) and return its pid.
        ``prefix`` runs first and execs qemu (it puts qemu into its cgroup:
        :meth:`vmagent.alloc.cgroup.Cgroups.wrap`); errors name qemu's argv."""
        self.launched_in = None
        self._seen = None
        rundir.clear_runtime(self.run_dir)
        try:
            proc = await asyncio.create_subprocess_exec(
                *prefix, *argv, cwd=self.run_dir, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
        except OSError as e:
            raise VMLaunchFailure(None, argv, f"{argv[0]}: {e.strerror or e}") from e
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            self.kill()
            raise VMLaunchFailure(None, argv, f"qemu did not finish starting within "
                                  f"{timeout:g}s", message="qemu start timed out")
        output = out.decode("utf-8", "replace")
        if proc.returncode != 0:
            self.kill()
            raise VMLaunchFailure(proc.returncode, argv, output)
        pid = self.pid()
        if pid is None:
            raise VMLaunchFailure(proc.returncode, argv, output + "\n(qemu exited right "
                                  "after daemonizing; see console.log)")
        return pid

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    async def wait_gone(self, timeout: float) -> bool:
        """Wait until qemu has exited; True if it did within ``timeout``. The process
        last seen as ours is followed by pid and start time until it is gone or a
        zombie: an exiting process loses its command line before it closes its files
        (and with them the disk image locks)."""
        self.pid()
        return bool(await poll_until(
            lambda: self._seen is None or not _running(*self._seen), timeout,
            interval=0.05))

    async def kill_and_wait(self, timeout: float = 10.0) -> None:
        self.kill(signal.SIGKILL)
        if not await self.wait_gone(timeout):
            raise Timeout(f"qemu of {self.run_dir.name} did not exit after SIGKILL")
