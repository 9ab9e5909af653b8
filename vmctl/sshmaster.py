"""One SSH login per VM boot: OpenSSH connection sharing (``ControlMaster``).

The readiness login of ``vmctl create`` / ``vmctl wait`` runs ``ssh`` with
``ControlMaster=auto`` and ``ControlPersist=60s``: its connection stays open in the
background for a minute after its last session, and ``vmctl ssh``, the
``vmctl ssh-config`` block and ``vmctl run`` open a channel on it instead of a new login
(a login costs 1-2 s in an emulated guest, a channel a few milliseconds).

The API (used by :mod:`vmctl.vmssh` and by anything else that runs ``ssh`` to a VM):

- :func:`socket_path` ``(target, status)``: the control socket for this boot of this VM,
  or None when no safe directory exists (then ssh runs without sharing);
- :func:`options` ``(target, status)``: the ``-o`` options to give ssh (a stale socket
  at that path is removed first);
- :func:`check` ``(path)``: whether a live master answers there (``ssh -O check``);
- :func:`close` ``(target, name)``: stop every master of a VM (``ssh -O exit``), before
  it is deleted, rebooted, reset or stopped.

Correctness:

- **where**: ``$XDG_RUNTIME_DIR/vmctl/ssh`` (when that is a directory of the user), else
  ``/tmp/vmctl-$UID/ssh``; each directory made with mode 0700, and used only when it is a
  real directory (not a link) owned by the user with no access for group or others.
  A socket there is used only when it is a socket owned by the user that answers
  ``ssh -O check``; anything else at its path is removed.
- **which VM, which boot**: the socket's name is ``<vm>-<boot>``: ``<vm>`` a digest of the
  agent's address and the VM's name, ``<boot>`` a digest of the VM's SSH port, instance
  id, creation time, boot id (the agent gives each boot of a VM a new one), its host key
  alias and the pinned known_hosts entry for that alias. A re-created, re-identified or
  rebooted VM, or one whose pinned host key changed, has another name, so an old master
  is never reached for it; ``close`` stops them all by the ``<vm>`` prefix.
- **gone**: a master that died leaves a socket that fails ``-O check``; it is removed and
  the next ssh logs in again (and becomes the new master).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
from pathlib import Path

from .address import Target

PERSIST = "60s"
# sun_path holds 108 bytes; ssh binds a temporary "<path>.<16 random chars>" first
MAX_PATH = 108 - 18
CHECK_TIMEOUT = 5.0


def runtime_dir() -> Path:
    """The user's runtime directory for vmctl (not created)."""
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        try:
            st = os.lstat(xdg)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            return Path(xdg) / "vmctl"
    return Path(f"/tmp/vmctl-{uid}")


def _private_dir(path: Path) -> bool:
    """Make ``path`` (mode 0700) if missing; True when it is a real directory of this
    user that nobody else may enter."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and stat.S_IMODE(st.st_mode) & 0o077 == 0)


def control_dir() -> Path | None:
    """The directory of the control sockets, made if missing; None when it (or its
    parent) is not private to the user: no sharing then."""
    base = runtime_dir()
    if not _private_dir(base) or not _private_dir(base / "ssh"):
        return None
    return base / "ssh"


def _digest(*parts: object, size: int = 10) -> str:
    text = "\0".join("" if p is None else str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def vm_prefix(target: Target, name: str) -> str:
    """The part of a socket name that says which agent's VM it is."""
    return _digest(target.address, name)


_entries: dict[tuple, str] = {}


def pinned_entry(alias: str, known_hosts: Path) -> str:
    """The known_hosts lines for ``alias`` (what ssh checks the VM's host key against,
    hashed or not: ``ssh-keygen -F`` finds both); empty when none is pinned yet. Asked
    once per version of the file."""
    try:
        st = os.stat(known_hosts)
    except OSError:
        return ""
    key = (alias, str(known_hosts), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _entries:
        try:
            proc = subprocess.run(["ssh-keygen", "-F", alias, "-f", str(known_hosts)],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL)
            out = proc.stdout if proc.returncode == 0 else ""
        except OSError:
            out = ""
        _entries[key] = "\n".join(sorted(ln for ln in out.splitlines()
                                         if ln and not ln.startswith("#")))
    return _entries[key]


def socket_name(target: Target, status: dict, alias: str, pinned: str) -> str:
    """``<vm>-<boot>`` (pure): see the module's docstring."""
    boot = _digest(status.get("ssh_port"), status.get("ssh_host"),
                   status.get("instance_id"), status.get("created"),
                   status.get("boot_id"), alias, pinned)
    return f"{vm_prefix(target, status['name'])}-{boot}"


def socket_path(target: Target, status: dict, alias: str, known_hosts: Path) -> Path | None:
    """The control socket for this boot of this VM, or None (no private directory, or
    a path too long for a unix socket)."""
    directory = control_dir()
    if directory is None:
        return None
    path = directory / socket_name(target, status, alias, pinned_entry(alias, known_hosts))
    return path if len(os.fsencode(path)) <= MAX_PATH else None


def _ssh_control(path: Path, command: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["ssh", "-o", f"ControlPath={escape(path)}", "-O", command,
                               "vmctl-master"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=CHECK_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _ours(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()


def check(path: Path) -> bool:
    """A live master of this user answers at ``path``."""
    if not _ours(path):
        return False
    proc = _ssh_control(path, "check")
    return proc is not None and proc.returncode == 0


def master_pid(path: Path) -> int | None:
    """The pid of the master at ``path`` (``ssh -O check`` says it), or None."""
    if not _ours(path):
        return None
    proc = _ssh_control(path, "check")
    m = re.search(r"pid=(\d+)", proc.stderr if proc is not None else "")
    return int(m.group(1)) if m and proc.returncode == 0 else None


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def prepare(path: Path) -> None:
    """Leave at ``path`` either a live master of this user or nothing: anything else
    (a dead master's socket, a file that is not a socket) is removed, so ssh can bind a
    new master there (it refuses to replace a file that exists)."""
    if not os.path.lexists(path):
        return
    if not check(path):
        _remove(path)


def escape(path: Path | str) -> str:
    """``path`` for ssh's ControlPath, which expands %-tokens."""
    return str(path).replace("%", "%%")


def options(path: Path | None) -> dict[str, str]:
    """ssh options for sharing the connection at ``path`` (made or reused); no sharing
    at all when ``path`` is None."""
    if path is None:
        return {"ControlMaster": "no", "ControlPath": "none"}
    prepare(path)
    return {"ControlMaster": "auto", "ControlPath": escape(path),
            "ControlPersist": PERSIST}


def close(target: Target, name: str) -> list[Path]:
    """Stop every master of VM ``name`` of this agent (``ssh -O exit``) and remove
    their sockets. Returns the sockets that were there."""
    directory = control_dir()
    if directory is None:
        return []
    try:
        found = sorted(directory.glob(f"{vm_prefix(target, name)}-*"))
    except OSError:
        return []
    for path in found:
        if _ours(path):
            _ssh_control(path, "exit")
        _remove(path)
    return found
