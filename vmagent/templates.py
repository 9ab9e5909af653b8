"""Templates: a booted guest's saved RAM and device state, and warm starts from it.

A template ``T`` lives in ``STATE/templates/T/``:

* ``disk.qcow2``: the template VM's disk (an overlay on its image), frozen read-only
  (mode 0444) after the save; every clone's disk is a new qcow2 overlay on it;
* ``vmstate.bin``: the migration stream written by QMP ``migrate`` to ``exec:cat > FILE``
  while the guest was stopped (RAM and device state); its size and sha256 are recorded;
* ``template.json``: the record (image, cpus, memory, disk, MAC, the argv it ran with,
  the state file's size and sha256, who the guest was);
* ``console.log`` and ``argv.json`` of the template VM, for diagnosis.

**Create** boots a private VM (not in the VM list) from the image, waits until SSH
answers and cloud-init has finished, syncs the guest's disks through the guest agent,
stops the CPUs, saves the state, quits qemu and freezes the files.

**Warm create** (``create`` with ``template``): a new overlay on the template's disk, a
seed with the clone's identity, qemu started with the template's device model (the same
argv but for name, paths, SSH port forward and vmgenid; the MAC is the template's, since
the restored guest has it in its device state) and ``-incoming defer``; then
``migrate-incoming`` from the state file, ``cont``, and re-identification through the
guest agent (:func:`reidentify_script`) before the VM is reported running. The new
vmgenid on the command line is written into the guest by qemu when the state is loaded
(vmgenid's post-load notifies the guest); a kernel with a vmgenid driver reseeds its RNG
then. Debian's cloud kernel has none, so the script also mixes in host entropy and
forces a reseed (``RNDRESEEDCRNG``) before anything else runs.

Everything here reaches the manager through :class:`TemplateOps`, a mixin of
:class:`~vmagent.manager.Manager`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import logging
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import argv as qargv
from . import disks, seed
from .errors import BadRequest, Conflict, ImageError, NotFound, QMPFailure, Timeout, \
    VMAgentError
from .fsutil import atomic_write_json, fsync_dir, read_json, sha256_file
from .qmp import guest_agent_call
from .spec import VMSpec, apply_defaults, check_name, format_size
from .store import Runtime, State, VMRecord, now_iso
from .vm import VM, ssh_banner
from .watch import vm_status

if TYPE_CHECKING:
    from .manager import Manager

log = logging.getLogger(__name__)

TEMPLATE_FILE = "template.json"
STATE_FILE = "vmstate.bin"
CLONE_MARKER = "template"            # in a clone's run dir: the template's name
CREATE_TIMEOUT = 1200.0              # boot + cloud-init of the template VM, under TCG
SAVE_TIMEOUT = 600.0
RESTORE_TIMEOUT = 300.0
GUEST_AGENT_WAIT = 60.0
HOST_KEY_TYPES = (("ed25519", []), ("ecdsa", ["-b", "256"]))
# qemu 7.2 limits migration to 128 MiB/s by default; the guest is stopped, go flat out
MAX_BANDWIDTH = 1 << 40


@dataclass
class Template:
    name: str
    image: str
    cpus: int
    memory: int
    disk: int
    mac: str
    vmgenid: str                      # the template VM's; every clone gets a new one
    hostname: str                     # who the saved guest is
    admins: list[str] = field(default_factory=list)   # the template's users (creator)
    state_size: int = 0
    state_sha256: str = ""
    created: str = ""
    build_seconds: float = 0.0
    save_seconds: float = 0.0
    argv: list[str] = field(default_factory=list)
    accel: str = "tcg"
    qemu_version: str | None = None
    path: Path | None = None          # the template's directory (not stored)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("path")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> "Template":
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        return cls(**{k: v for k, v in data.items() if k in known}, path=path)

    @property
    def disk_path(self) -> Path:
        assert self.path is not None
        return self.path / qargv.DISK

    @property
    def state_path(self) -> Path:
        assert self.path is not None
        return self.path / STATE_FILE


class TemplateStore:
    """``STATE/templates``: one directory per template, staged as ``.new-T-x``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".new-*"):
            log.warning("removing leftover template build %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        self._verified: dict[str, tuple] = {}   # name -> stat key of the verified file

    def dir(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and (p / TEMPLATE_FILE).is_file())

    def exists(self, name: str) -> bool:
        return (self.dir(name) / TEMPLATE_FILE).is_file()

    def get(self, name: str) -> Template:
        check_name(name)
        path = self.dir(name)
        try:
            data = read_json(path / TEMPLATE_FILE)
        except FileNotFoundError:
            raise NotFound(f"no template named {name!r} (see 'vmctl template list')",
                           template=name) from None
        except (OSError, ValueError) as e:
            raise ImageError(f"template {name!r}: unreadable {TEMPLATE_FILE}: {e}") from e
        return Template.from_json(data, path)

    def list(self) -> list[Template]:
        out = []
        for n in self.names():
            with contextlib.suppress(VMAgentError):
                out.append(self.get(n))
        return out

    def save(self, tpl: Template, directory: Path) -> None:
        atomic_write_json(directory / TEMPLATE_FILE, tpl.to_json(), mode=0o444)

    def new_dir(self, name: str) -> Path:
        path = self.root / f".new-{name}-{os.urandom(4).hex()}"
        path.mkdir(mode=0o750)
        return path

    def commit(self, staging: Path, name: str) -> Path:
        final = self.dir(name)
        if final.exists():
            raise Conflict(f"template {name!r} already exists")
        os.rename(staging, final)
        fsync_dir(self.root)
        return final

    async def verify(self, tpl: Template) -> None:
        """The state file is the one saved: its size, then its sha256 (hashed once per
        version of the file: the result is kept for its inode, size, mtime and ctime)."""
        path = tpl.state_path
        what = f"template {tpl.name!r}: state file {path}"
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ImageError(f"{what} is missing; the template cannot be used (remove it "
                             "and create it again)", template=tpl.name) from None
        if st.st_size != tpl.state_size:
            raise ImageError(f"{what} is corrupt: {st.st_size} bytes, {tpl.state_size} "
                             "were saved; the template cannot be used (remove it and "
                             "create it again)", template=tpl.name, size=st.st_size,
                             expected_size=tpl.state_size)
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, tpl.state_sha256)
        if self._verified.get(tpl.name) == key:
            return
        digest = await asyncio.to_thread(sha256_file, path)
        if digest != tpl.state_sha256:
            self._verified.pop(tpl.name, None)
            raise ImageError(f"{what} is corrupt: sha256 {digest[:16]}... differs from the "
                             f"recorded {tpl.state_sha256[:16]}...; the template cannot be "
                             "used (remove it and create it again)", template=tpl.name,
                             sha256=digest, expected_sha256=tpl.state_sha256)
        self._verified[tpl.name] = key

    def mark_verified(self, tpl: Template) -> None:
        """The state file was just hashed while saving it."""
        st = tpl.state_path.stat()
        self._verified[tpl.name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                    tpl.state_sha256)

    def remove(self, name: str, keep_disk: bool) -> None:
        """Delete a template. ``keep_disk``: VMs still use its disk as their base, so the
        directory stays with only the disk (no longer listed; collected once unused)."""
        path = self.dir(name)
        self._verified.pop(name, None)
        if keep_disk:
            for p in path.iterdir():
                if p.name != qargv.DISK:
                    p.unlink()
            fsync_dir(path)
            return
        grave = self.root / f".new-del-{name}-{os.urandom(4).hex()}"
        os.rename(path, grave)
        fsync_dir(self.root)
        _rmtree_readonly(grave)

    def orphans(self) -> list[str]:
        """Directories of removed templates kept for their disk."""
        return sorted(p.name for p in self.root.iterdir()
                      if not p.name.startswith(".") and p.is_dir()
                      and not (p / TEMPLATE_FILE).exists())


def _rmtree_readonly(path: Path) -> None:
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            os.chmod(p, 0o644 if p.is_file() else 0o755)
    shutil.rmtree(path, ignore_errors=True)


# --- re-identification ------------------------------------------------------------------

def host_keys(comment: str) -> dict[str, tuple[str, str]]:
    """Fresh SSH host keys made on the agent's host (the guest's RNG is the template's
    until it reseeds): {type: (private, public)}. RSA is left out: it takes seconds to
    make and every current client takes ed25519."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="vmagent-hostkeys-") as tmp:
        for kind, extra in HOST_KEY_TYPES:
            path = Path(tmp) / f"ssh_host_{kind}_key"
            subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C",
                            comment, "-f", str(path)], check=True, capture_output=True)
            out[kind] = (path.read_text(), path.with_suffix(".pub").read_text().strip())
    return out


def console_key_block(keys: dict[str, tuple[str, str]]) -> bytes:
    """The block cloud-init prints at first boot; vmctl pins the keys it finds there."""
    lines = ["", "-----BEGIN SSH HOST KEY KEYS-----",
             *(" ".join(pub.split()[:2]) + f" root@{kind}" for kind, (_, pub) in
               keys.items()),
             "-----END SSH HOST KEY KEYS-----", ""]
    return ("\r\n".join(lines)).encode()


Entry = tuple  # (content: bytes | None for a directory, mode: int, owner: str)


def reidentify_files(name: str, spec: VMSpec, keys: dict[str, tuple[str, str]],
                     machine_id: str) -> dict[str, Entry]:
    """What a clone gets, as one tar: {absolute path: (content or None for a directory,
    mode, owner)}. Owners are names: tar (as root) maps them to the guest's ids, so the
    users must exist before it runs (the script creates missing ones first)."""
    files: dict[str, Entry] = {
        "/etc/hostname": (f"{name}\n".encode(), 0o644, "root"),
        "/etc/machine-id": (f"{machine_id}\n".encode(), 0o444, "root"),
    }
    conf = ["# written by vmagent for a warm-started clone: its own host keys only"]
    for kind, (priv, pub) in keys.items():
        path = f"/etc/ssh/ssh_host_{kind}_key"
        files[path] = (priv.encode(), 0o600, "root")
        files[path + ".pub"] = ((pub.strip() + "\n").encode(), 0o644, "root")
        conf.append(f"HostKey {path}")
    files["/etc/ssh/sshd_config.d/05-vmagent-hostkeys.conf"] = (
        ("\n".join(conf) + "\n").encode(), 0o644, "root")
    keys_text = "".join(k + "\n" for k in spec.ssh_keys).encode()
    for user in spec.admins:
        files[f"/etc/sudoers.d/90-vmagent-{user}"] = (
            f"{user} {seed.SUDO_RULE}\n".encode(), 0o440, "root")
        files[f"/home/{user}/.ssh"] = (None, 0o700, user)
        files[f"/home/{user}/.ssh/authorized_keys"] = (keys_text, 0o600, user)
    return files


def _tar(files: dict[str, Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        now = time.time()
        for path, (data, mode, owner) in files.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.mode, info.mtime = mode, now
            info.uname = info.gname = owner
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def reidentify_script(name: str, spec: VMSpec, keys: dict[str, tuple[str, str]],
                      machine_id: str, epoch: float, entropy: bytes,
                      template_users: list[str] | None = None) -> str:
    """A POSIX shell script the guest agent runs as root in a fresh clone: RNG, clock,
    users, hostname, machine-id, SSH host keys and authorized_keys (only this VM's: the
    keys of the template's users are emptied). As few programs as possible: under TCG
    every program runs cold after a restore (its code is translated again).
    ``template_users``: the users the template has (the clone's others are created)."""
    q = shlex.quote
    payload = base64.b64encode(_tar(reidentify_files(name, spec, keys, machine_id)))
    sec, usec = int(epoch), int((epoch % 1) * 1e6)
    known = set(template_users or ())
    lines = [
        "set -u",
        "exec 2>&1",
        "m() { read up _ < /proc/uptime; echo \"T $up $1\"; }",
        "m start",
        # the RNG: host entropy into the pool, then RNDRESEEDCRNG (the kernel's crng is
        # the template's until it reseeds; Debian's cloud kernel has no vmgenid driver);
        # the clock: settimeofday (x86_64 syscall 164), which stood still since the save
        "out=$(perl -e 'open(F, \">\", \"/dev/urandom\") or exit 1; "
        f"syswrite(F, pack(\"H*\", \"{entropy.hex()}\")); "
        "print \"rng-reseeded\\n\" if ioctl(F, 0x5207, 0); "
        f"print \"clock-set\\n\" if syscall(164, pack(\"qq\", {sec}, {usec}), 0) == 0')",
        "echo \"$out\"",
        f"case \"$out\" in *clock-set*) ;; *) date -u -s @{epoch:.3f} >/dev/null;; esac",
        "m rng-clock",
    ]
    groups = ",".join(seed.ADMIN_GROUPS)
    for user in spec.admins:
        if user not in known:
            lines.append(f"getent passwd {q(user)} >/dev/null || "
                         f"useradd -m -s /bin/bash -G {groups} {q(user)}")
    lines += [
        "m users",
        "rm -f /etc/ssh/ssh_host_*",
        # nobody keeps the keys of the template's users
        "for f in /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys; do "
        "[ -f \"$f\" ] && : > \"$f\"; done",
        f"echo {payload.decode()} | base64 -d | tar -x -C /",
        f"echo {q(name)} > /proc/sys/kernel/hostname",
        f"sed -i -E 's/^(127\\.0\\.1\\.1[[:space:]]+).*/\\1{name} {name}/' /etc/hosts",
        "if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then "
        "cat /etc/machine-id > /var/lib/dbus/machine-id; fi",
        "m files",
        # no sshd restart: every connection's sshd (re-executed by the listener) loads
        # the host keys from their files; the HostKey list above counts from the next start
        "echo reidentified",
    ]
    return "\n".join(lines) + "\n"


async def guest_exec(qga: Path, name: str, path: str, args: list[str],
                     timeout: float = 60.0, agent_wait: float = 0.0) -> tuple[int, str]:
    """Run a program in the guest through the guest agent; (exit code, output).
    ``agent_wait``: how long to retry while the guest agent does not answer yet."""
    agent_deadline = time.monotonic() + agent_wait
    while True:
        try:
            started = await guest_agent_call(qga, name, "guest-exec", {
                "path": path, "arg": args, "capture-output": True}, timeout=10)
            break
        except VMAgentError as e:
            if time.monotonic() > agent_deadline:
                raise Timeout(f"{name}: the guest agent did not run {path} "
                              f"({e.message})") from e
            await asyncio.sleep(0.05)
    pid = started["pid"]
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        st = await guest_agent_call(qga, name, "guest-exec-status", {"pid": pid},
                                    timeout=10)
        if st.get("exited"):
            out = base64.b64decode(st.get("out-data", "") or "") + \
                base64.b64decode(st.get("err-data", "") or "")
            return st.get("exitcode", -1), out.decode("utf-8", "replace")
        if time.monotonic() > deadline:
            raise Timeout(f"{name}: {path} did not finish in the guest within {timeout:g}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)


async def wait_guest_agent(qga: Path, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await guest_agent_call(qga, name, "guest-ping", timeout=2)
            return
        except VMAgentError as e:
            if time.monotonic() > deadline:
                raise Timeout(f"{name}: the guest agent did not answer within "
                              f"{timeout:g}s ({e.message})") from e
            await asyncio.sleep(0.1)


# --- the manager's operations -------------------------------------------------------------

class TemplateOps:
    """Template operations of the Manager (mixed into it)."""

    _template_store: TemplateStore | None = None

    @property
    def templates(self: "Manager") -> TemplateStore:   # type: ignore[misc]
        if self._template_store is None:
            self._template_store = TemplateStore(self.settings.state_dir / "templates")
        return self._template_store

    def _template_lock(self: "Manager", name: str) -> asyncio.Lock:  # type: ignore[misc]
        locks = self.__dict__.setdefault("_tpl_locks", {})
        return locks.setdefault(name, asyncio.Lock())

    def template_users(self: "Manager", name: str) -> list[str]:  # type: ignore[misc]
        """VMs whose disk is an overlay on the template's disk."""
        users = []
        for vm_name, vm in self.vms.items():
            with contextlib.suppress(OSError):
                if (vm.run_dir / CLONE_MARKER).read_text().strip() == name:
                    users.append(vm_name)
        return sorted(users)

    def templates_of_image(self: "Manager", image: str) -> list[str]:  # type: ignore[misc]
        """Templates (and removed templates' kept disks) built on ``image``."""
        out = [f"template {t.name}" for t in self.templates.list() if t.image == image]
        for orphan in self.templates.orphans():
            users = self.template_users(orphan)
            if users:
                out.append(f"the disk of removed template {orphan} (used by "
                           f"{', '.join(users)})")
        return out

    def _collect_orphans(self: "Manager") -> None:  # type: ignore[misc]
        for orphan in self.templates.orphans():
            if not self.template_users(orphan):
                log.info("removing the disk of removed template %s: no VM uses it", orphan)
                _rmtree_readonly(self.templates.dir(orphan))

    # --- reading ---

    def _template_json(self: "Manager", tpl: Template) -> dict:  # type: ignore[misc]
        return {**tpl.to_json(), "path": str(tpl.path),
                "memory_h": format_size(tpl.memory), "disk_h": format_size(tpl.disk),
                "vms": self.template_users(tpl.name)}

    async def op_template_list(self: "Manager") -> dict:  # type: ignore[misc]
        self._collect_orphans()
        return {"templates": [{k: v for k, v in self._template_json(t).items()
                               if k != "argv"} for t in self.templates.list()]}

    async def op_template_show(self: "Manager", template: str) -> dict:  # type: ignore[misc]
        return self._template_json(self.templates.get(template))

    async def op_template_remove(self: "Manager", template: str,  # type: ignore[misc]
                                 force: Any = False) -> dict:
        force = _bool(force, "force")
        async with self._template_lock(template):
            tpl = self.templates.get(template)
            users = self.template_users(template)
            if users and not force:
                raise Conflict(f"template {template!r} is used by VM(s) "
                               f"{', '.join(users)} (their disks are overlays on it); "
                               "delete them first, or force: the template disappears "
                               "and its disk is kept until they are deleted",
                               vms=users)
            self.templates.remove(tpl.name, keep_disk=bool(users))
        return {"deleted": template, "disk_kept_for": users}

    # --- create ---

    async def op_template_create(self: "Manager", template: Any = None,  # type: ignore[misc]
                                 image: Any = None, timeout: Any = None,
                                 **fields: Any) -> dict:
        if not template:
            raise BadRequest("template (a name) is required")
        check_name(template)
        spec = VMSpec.from_dict({"name": template, "image": image, **fields})
        try:
            limit = CREATE_TIMEOUT if timeout in (None, "") else float(timeout)
        except (TypeError, ValueError):
            raise BadRequest(f"timeout: expected seconds, got {timeout!r}") from None
        lock = self._template_lock(template)
        if lock.locked():
            raise Conflict(f"template {template!r} is being created")
        async with lock:
            if self.templates.dir(template).exists():
                raise Conflict(f"template {template!r} already exists" if
                               self.templates.exists(template) else
                               f"the disk of a removed template {template!r} is still used "
                               f"by VM(s) {', '.join(self.template_users(template))}")
            return await self._build_template(spec, limit)

    async def _build_template(self: "Manager", spec: VMSpec,  # type: ignore[misc]
                              limit: float) -> dict:
        t0 = time.monotonic()
        img = await self._image_for(spec.image or self.settings.defaults.image, pull=True)
        spec = apply_defaults(spec, self.settings.defaults, img.virtual_size)
        rt = Runtime(state=State.STOPPED, mac=_mac(), vmgenid=str(uuid.uuid4()),
                     instance_id=seed.new_instance_id(spec.name), created=now_iso(),
                     ssh_port=self._free_port())
        staging = self.templates.new_dir(spec.name)
        vm: VM | None = None
        try:
            await disks.create_overlay(img.path, img.format, staging / qargv.DISK, spec.disk)
            seed.write_seed_iso(staging / qargv.SEED, seed.render_seed(
                spec, rt.instance_id, rt.mac, img.cloud_config))
            rec = VMRecord(spec.name, staging, spec, rt)
            vm = VM(rec)
            for attempt in range(3):
                argv = self._argv(rec, img)
                try:
                    await vm.launch(argv)
                    break
                except VMAgentError as e:
                    if "hostfwd" in getattr(e, "output", "") and attempt < 2:
                        rt.ssh_port = self._free_port(avoid=rt.ssh_port)
                        continue
                    raise
            atomic_write_json(staging / "argv.json", argv)
            log.info("template %s: booting from %s (pid %s)", spec.name, img.name,
                     vm.machine.pid())
            await self._wait_booted(vm, t0 + limit)
            booted = time.monotonic()
            qga = staging / qargv.QGA_SOCK
            await wait_guest_agent(qga, spec.name, GUEST_AGENT_WAIT)
            code, out = await guest_exec(qga, spec.name, "/bin/sync", [], timeout=120)
            if code != 0:
                raise QMPFailure(f"template {spec.name}: sync in the guest failed: {out}")
            size, digest = await self._save_state(vm, staging / STATE_FILE)
            saved = time.monotonic()
            await vm.quit()
            for f in (qargv.DISK, STATE_FILE):
                os.chmod(staging / f, 0o444)
            for f in (qargv.SEED, qargv.PIDFILE, qargv.QMP_SOCK, qargv.QGA_SOCK,
                      qargv.CONSOLE_SOCK, qargv.VNC_SOCK):
                (staging / f).unlink(missing_ok=True)
            tpl = Template(name=spec.name, image=img.name, cpus=spec.cpus,
                           memory=spec.memory, disk=spec.disk, mac=rt.mac,
                           vmgenid=rt.vmgenid, hostname=spec.name, admins=list(spec.admins),
                           state_size=size, state_sha256=digest, created=now_iso(),
                           build_seconds=round(saved - t0, 2),
                           save_seconds=round(saved - booted, 2), argv=argv,
                           accel=self.accel.name if self.accel else "tcg",
                           qemu_version=self.qemu_version)
            self.templates.save(tpl, staging)
            tpl.path = self.templates.commit(staging, spec.name)
            self.templates.mark_verified(tpl)
        except BaseException:
            if vm is not None:
                with contextlib.suppress(Exception):
                    if vm.machine.alive():
                        await vm.quit()
                    await vm.detach()
            _rmtree_readonly(staging)
            raise
        log.info("template %s: saved %s of state in %.1fs", tpl.name,
                 format_size(tpl.state_size), tpl.save_seconds)
        return self._template_json(tpl)

    async def _wait_booted(self: "Manager", vm: VM, deadline: float) -> None:  # type: ignore[misc]
        """SSH answers and cloud-init has finished (from the console log)."""
        while True:
            if not vm.machine.alive():
                raise QMPFailure(f"template {vm.name}: qemu exited while booting; console: "
                                 f"{_console_tail(vm)}")
            if vm.boot_progress()["cloud_init"] == "done" and await vm.check_ssh():
                return
            if time.monotonic() > deadline:
                raise Timeout(f"template {vm.name}: not booted (SSH and cloud-init) in time; "
                              f"console: {_console_tail(vm)}")
            await asyncio.sleep(1)

    async def _save_state(self: "Manager", vm: VM, path: Path) -> tuple[int, str]:  # type: ignore[misc]
        await vm.qmp("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        await vm.qmp("stop")
        await vm.qmp("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
        deadline = time.monotonic() + SAVE_TIMEOUT
        while True:
            st = await vm.qmp("query-migrate")
            status = st.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise QMPFailure(f"template {vm.name}: saving the state failed: "
                                 f"{st.get('error-desc', status)}")
            if time.monotonic() > deadline:
                raise Timeout(f"template {vm.name}: saving the state took over "
                              f"{SAVE_TIMEOUT:g}s")
            await asyncio.sleep(0.1)
        # exec: returns when cat has its input; wait until the file is complete
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        digest = await asyncio.to_thread(sha256_file, path)
        return path.stat().st_size, digest

    # --- warm create ---

    async def _warm_create(self: "Manager", template: Any, dry_run: bool,  # type: ignore[misc]
                           start: bool, fields: dict[str, Any]) -> dict:
        if not isinstance(template, str):
            raise BadRequest("template: expected a template name")
        tpl = self.templates.get(template)
        given = VMSpec.from_dict(fields)
        # the clone's device model and RAM are the template's
        for key, have in (("image", tpl.image), ("cpus", tpl.cpus),
                          ("memory", tpl.memory), ("disk", tpl.disk)):
            value = getattr(given, key)
            if value is not None and value != have:
                shown = (lambda v: format_size(v)) if key in ("memory", "disk") else str
                raise BadRequest(
                    f"{key}: a VM warm-started from template {tpl.name!r} has the "
                    f"template's {key} ({shown(have)}), not {shown(value)}; create a "
                    f"template with {key} {shown(value)}, or create the VM without "
                    "--template", template=tpl.name)
        if not start and not dry_run:
            raise BadRequest("start: a warm start from a template starts the VM; "
                             "--no-start is not available with --template")
        if given.name in self.vms:
            raise Conflict(f"a VM named {given.name!r} already exists", vm=given.name)
        img = self.images.resolve(tpl.image)
        spec = apply_defaults(dataclasses.replace(given, image=tpl.image, cpus=tpl.cpus,
                                                  memory=tpl.memory, disk=tpl.disk),
                              self.settings.defaults, img.virtual_size)
        rt = Runtime(state=State.STOPPED, mac=tpl.mac, vmgenid=str(uuid.uuid4()),
                     instance_id=seed.new_instance_id(spec.name), created=now_iso(),
                     ssh_port=self._free_port())
        # only the host key types the clone has: its identity stays across reboots
        extra = seed.merge_cloud_config(img.cloud_config or {}, {
            "ssh_genkeytypes": [k for k, _ in HOST_KEY_TYPES]}, "template")
        files = seed.render_seed(spec, rt.instance_id, rt.mac, extra)
        if dry_run:
            rec = VMRecord(spec.name, self.store.run_dir(spec.name), spec, rt)
            return {"dry_run": True, "spec": spec.to_dict(), "image": img.name,
                    "template": tpl.name,
                    "argv": self._argv(rec, img) + ["-incoming", "defer"],
                    "seed": {k: v.decode() for k, v in files.items()}}
        accel = self.accel.name if self.accel else "tcg"
        if (tpl.qemu_version, tpl.accel) != (self.qemu_version, accel):
            # the saved device state fits the qemu (machine type, CPU model) that saved it
            raise ImageError(f"template {tpl.name!r} was saved by qemu {tpl.qemu_version} "
                             f"with {tpl.accel}; this agent runs qemu {self.qemu_version} "
                             f"with {accel}: create the template again",
                             template=tpl.name)
        t0 = time.monotonic()
        async with self._template_lock(tpl.name):
            await self.templates.verify(tpl)
            keys = await asyncio.to_thread(host_keys, f"root@{spec.name}")
            staging = self.store.new_dir(spec.name)
            try:
                await disks.create_overlay(tpl.disk_path, "qcow2", staging / qargv.DISK,
                                           tpl.disk)
                seed.write_seed_iso(staging / qargv.SEED, files)
                (staging / CLONE_MARKER).write_text(tpl.name + "\n")
                # vmctl pins the host keys it finds in the console log
                with open(staging / qargv.CONSOLE_LOG, "ab") as f:
                    f.write(console_key_block(keys))
                rec = VMRecord(spec.name, staging, spec, rt)
                self.store.save_spec(rec)
                self.store.save_state(rec)
                rec.run_dir = self.store.commit_new(staging, spec.name)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        prepared = time.monotonic()
        vm = self.vms[spec.name] = VM(rec)
        vm.lock = self._name_locks.pop(spec.name, vm.lock)
        timings: dict[str, float] = {"prepare_s": round(prepared - t0, 3)}

        async def restore(vm: VM) -> None:
            await self._restore(vm, tpl, keys, timings)

        try:
            await self._launch(vm, extra_argv=["-incoming", "defer"], restore=restore)
        except BaseException:
            with contextlib.suppress(Exception):
                await vm.quit()
            del self.vms[spec.name]
            self.store.remove(spec.name)
            raise
        if spec.user_data:
            # the caller's cloud-config runs at the clone's next boot, not in the restore
            rt.config_pending = True
            self.store.save_state(rec)
        timings["total_s"] = round(time.monotonic() - t0, 3)
        log.info("%s: warm-started from template %s: %s", spec.name, tpl.name, timings)
        return {**vm_status(vm), "template": tpl.name,
                "host_keys": [pub for _, pub in keys.values()], "warm": timings}

    async def _restore(self: "Manager", vm: VM, tpl: Template,  # type: ignore[misc]
                       keys: dict[str, tuple[str, str]], timings: dict[str, float]) -> None:
        """Load the state into the just-started qemu, run it, re-identify the guest."""
        t0 = time.monotonic()
        await vm.qmp("migrate-incoming",
                     {"uri": f"exec:cat {shlex.quote(str(tpl.state_path))}"})
        deadline = t0 + RESTORE_TIMEOUT
        while True:
            st = await vm.qmp("query-migrate")
            status = st.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled") or not vm.machine.alive():
                raise QMPFailure(f"{vm.name}: loading the state of template {tpl.name} "
                                 f"failed: {st.get('error-desc', status)}; console: "
                                 f"{_console_tail(vm)}", template=tpl.name)
            if time.monotonic() > deadline:
                raise Timeout(f"{vm.name}: loading the state of template {tpl.name} took "
                              f"over {RESTORE_TIMEOUT:g}s")
            await asyncio.sleep(0.02)
        if not (await vm.qmp("query-status")).get("running"):
            await vm.qmp("cont")
        loaded = time.monotonic()
        timings["restore_s"] = round(loaded - t0, 3)
        qga = vm.run_dir / qargv.QGA_SOCK
        script = reidentify_script(
            vm.name, vm.rec.spec, keys, uuid.uuid4().hex, time.time(),
            os.urandom(64), tpl.admins)
        code, out = await guest_exec(qga, vm.name, "/bin/sh", ["-c", script], timeout=120,
                                     agent_wait=GUEST_AGENT_WAIT)
        if code != 0 or "reidentified" not in out:
            raise QMPFailure(f"{vm.name}: re-identifying the clone failed (exit {code}): "
                             f"{out.strip()[-500:]}")
        timings["reidentify_s"] = round(time.monotonic() - loaded, 3)
        timings["rng_reseeded"] = "rng-reseeded" in out       # type: ignore[assignment]
        marks = [ln.split()[1:3] for ln in out.splitlines() if ln.startswith("T ")]
        if marks:   # where the script spent its time (guest seconds)
            timings["guest_steps"] = {label: round(float(t) - float(marks[i][0]), 3)  # type: ignore[assignment]
                                      for i, (t, label) in enumerate(marks[1:])}
        # one patient connection: the first sshd after a restore runs cold, and short
        # timeouts would only start more of them
        deadline = time.monotonic() + 60
        port = vm.rec.rt.ssh_port
        while not await ssh_banner("127.0.0.1", port, timeout=20):
            if time.monotonic() > deadline:
                raise Timeout(f"{vm.name}: sshd did not answer after re-identification")
            await asyncio.sleep(0.05)
        vm.ssh_ready, vm.ssh_checked = True, time.monotonic()
        timings["ssh_s"] = round(time.monotonic() - t0, 3)


def _console_tail(vm: VM, n: int = 400) -> str:
    try:
        data = (vm.run_dir / qargv.CONSOLE_LOG).read_bytes()[-n:]
    except OSError:
        return "(no console log)"
    return data.decode("utf-8", "replace").strip().replace("\r", "")


def _mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (None, "", 0, "0", "false", "False", "no"):
        return False
    if value in (1, "1", "true", "True", "yes"):
        return True
    raise BadRequest(f"{what}: expected true or false, got {value!r}")
