"""Files that enter the image store, and what they must be.

**Whose rights.** A path an agent's caller names (``image_import``) is opened with the
caller's rights, not the agent's: a small helper process running as the caller's uid
and groups opens it and passes the descriptor back over a socket (``SCM_RIGHTS``), so
the kernel decides what the caller may read, symlinks and directory permissions
included, and nothing can be swapped in between the check and the copy. Only a regular
file is accepted.

**What it is.** Before anything appears in the store: a qcow2 passes ``qemu-img
check``; a raw disk has a partition table or a file system where one is expected; a
kernel has the x86 boot header (or is an ELF image); an initrd starts like a cpio
archive or a compressed stream; nothing is empty.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmagent import errors
from vmagent.context import Caller
from vmagent.qemu import disks

log = logging.getLogger(__name__)

# opens argv[1] as the process's user and sends the descriptor on the socket argv[2]
_OPENER = r"""
import os, socket, stat, sys
s = socket.socket(fileno=int(sys.argv[2]))
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise IsADirectoryError(0, "not a regular file")
except OSError as e:
    s.sendall(("E" + (e.strerror or str(e))).encode())
else:
    socket.send_fds(s, [b"K"], [fd])
"""
HELPER_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Reader:
    """Opens files of the agent's host with someone's rights (``uid`` None: the
    agent's own)."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def for_caller(cls, caller: Caller) -> "Reader":
        """A local caller reads with their own rights; root and token callers (who
        have no local account: operators, as the table allows only them) with the
        agent's."""
        if caller.uid is None or caller.uid == 0:
            return cls()
        pw = pwd.getpwuid(caller.uid)
        return cls(caller.uid, pw.pw_gid, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)))

    async def open(self, path: str | os.PathLike, what: str) -> int:
        """A read-only descriptor of the regular file ``path`` (the caller closes it)."""
        if self.uid is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise errors.BadRequest(f"{what}: {path}: {e.strerror}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise errors.BadRequest(f"{what}: {path} is not a regular file")
            return fd
        return await self._open_as(os.fspath(path), what)

    async def _open_as(self, path: str, what: str) -> int:
        python = HELPER_PYTHON if os.path.exists(HELPER_PYTHON) else sys.executable
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                python, "-I", "-c", _OPENER, path, str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), user=self.uid, group=self.gid,
                extra_groups=list(self.groups), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd="/")
            theirs.close()
            try:
                _, err = await asyncio.wait_for(proc.communicate(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                raise errors.Timeout(f"{what}: opening {path} took over 30 s") from None
            ours.setblocking(False)          # the helper has exited: all it sent is here
            try:
                msg, fds, _, _ = socket.recv_fds(ours, 4096, 1)
            except OSError:
                msg, fds = b"", []
        finally:
            ours.close()
            theirs.close()
        if msg.startswith(b"K") and fds:
            return fds[0]
        for fd in fds:
            os.close(fd)
        reason = msg[1:].decode(errors="replace") if msg.startswith(b"E") else \
            err.decode(errors="replace").strip()[-200:] or "cannot open it"
        raise errors.BadRequest(f"{what}: {path}: {reason} (opened with the caller's "
                                "rights)")


def fd_path(fd: int) -> str:
    """A path other processes of the agent's user (qemu-img) open ``fd`` by."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def copy_fd(fd: int, dest: Path,
            algorithms: tuple[str, ...] = ("sha256",)) -> disks.SparseWriter:
    """Copy an open file to ``dest`` (sparse, hashed). Blocking: run in a thread."""
    os.lseek(fd, 0, os.SEEK_SET)
    with disks.SparseWriter(dest, algorithms) as w:
        buf = bytearray(disks.CHUNK)
        view = memoryview(buf)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while n := f.readinto(buf):
                w.write(view[:n])
    return w


# --- what a file is ----------------------------------------------------------------------

def _at(data: bytes, offset: int, magic: bytes) -> bool:
    return data[offset:offset + len(magic)] == magic


RAW_SIGNATURES = (
    (510, b"\x55\xaa", "a partition table (MBR)"),
    (512, b"EFI PART", "a GPT partition table"),
    (1080, b"\x53\xef", "an ext2/3/4 file system"),
    (0, b"XFSB", "an XFS file system"),
    (65600, b"_BHRfS_M", "a btrfs file system"),
    (32769, b"CD001", "an ISO 9660 image"),
    (0, b"hsqs", "a squashfs image"),
    (512, b"LABELONE", "an LVM physical volume"),
)
HEADER_BYTES = 65600 + 8


def raw_disk_problem(header: bytes, size: int) -> str | None:
    """Why ``header`` (the first bytes) of a raw file of ``size`` bytes is no disk."""
    if size == 0:
        return "the file is empty"
    if size % 512:
        return f"its size ({size} bytes) is not a whole number of 512-byte sectors"
    if size < 1 << 20:
        return f"it is only {size} bytes"
    if not any(_at(header, off, magic) for off, magic, _ in RAW_SIGNATURES):
        return "it has neither a partition table nor a file system a VM could boot"
    return None


def kernel_problem(header: bytes, size: int) -> str | None:
    if size == 0:
        return "the file is empty"
    if _at(header, 0x202, b"HdrS") or _at(header, 0, b"\x7fELF"):
        return None
    return "it is not a Linux kernel (no x86 boot header 'HdrS', not ELF)"


INITRD_MAGIC = (b"070701", b"070702", b"070707", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00",
                b"\x5d\x00\x00", b"\x02\x21\x4c\x18", b"\x04\x22\x4d\x18",
                b"\x28\xb5\x2f\xfd", b"\x89LZO")


def initrd_problem(header: bytes, size: int) -> str | None:
    if size == 0:
        return "the file is empty"
    if any(header.startswith(m) for m in INITRD_MAGIC):
        return None
    return "it is not an initrd (neither a cpio archive nor a compressed one)"


def read_header(fd: int, n: int = HEADER_BYTES) -> bytes:
    return os.pread(fd, n, 0)


def check_content(fd: int, kind: str, what: str) -> None:
    """Refuse a kernel or initrd that is not one (``kind``: kernel | initrd)."""
    size = os.fstat(fd).st_size
    problem = (kernel_problem if kind == "kernel" else initrd_problem)(read_header(fd),
                                                                       size)
    if problem:
        raise errors.ImageError(f"{what} refused: {problem}", kind=kind)


async def check_disk_file(path: Path, fmt: str) -> dict[str, Any]:
    """A disk about to enter the store: ``qemu-img check`` for qcow2 (corruption,
    truncation: refused; leaked clusters: logged), the content of a raw one."""
    size = path.stat().st_size
    if size == 0:
        raise errors.ImageError("the image is empty (0 bytes)")
    if fmt == "raw":
        with open(path, "rb") as f:
            problem = raw_disk_problem(f.read(HEADER_BYTES), size)
        if problem:
            raise errors.ImageError(f"the raw image is refused: {problem}")
        return {}
    proc = await asyncio.create_subprocess_exec(
        disks.QEMU_IMG, "check", "-f", fmt, "--output=json", "--", os.path.abspath(path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    try:
        report = json.loads(out)
    except ValueError:
        report = {}
    # exit 0: clean; 3: leaked clusters only (harmless); 2: corruptions; 1: no check
    if proc.returncode == 3 and not report.get("corruptions"):
        log.warning("%s: %s leaked clusters (harmless)", path, report.get("leaks"))
    elif proc.returncode != 0:
        found = report.get("corruptions")
        last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise errors.ImageError(
            f"the {fmt} image is corrupt or truncated"
            + (f" ({found} corruptions found by qemu-img check)" if found else
               f" (qemu-img check: {last[:200]})"), check=report)
    return report
