#!/usr/bin/env python3
"""A stand-in for ``qemu-system-x86_64`` (stdlib only), in the manner of Ganeti's QmpStub:
it takes the argv that ``vmagent/qemu/argv.py`` builds, daemonizes like qemu and serves
QMP, the guest agent, the serial console, the VNC socket and the forwarded SSH port on
real sockets, so that the agent's logic runs without a guest.

Behaviour switches (re-read at every command and every 50 ms) come from JSON control
files, later ones overriding earlier ones:

* ``HOME/stub-control.json``, where HOME is ``$QEMU_STUB_HOME`` or the directory of the
  installed program (not of ``tests/qemu_stub.py`` itself); its ``"vms": {NAME: {...}}``
  entry applies to the VM named NAME (``-name``);
* ``stub-control.json`` in the run dir (the working directory qemu is started in).

Keys: ``fail_start`` ({"message", "exitcode", "times"}: fail before daemonizing;
``{port}`` in the message is the SSH forward's port; ``times`` is counted down in the
file it came from), ``ignore_powerdown``, ``guest_agent`` ("on", "silent": the socket
exists but never answers, "absent": no socket), ``hang`` (read QMP and guest-agent
commands, answer none), ``guest_agent_delay`` (seconds before each guest-agent answer:
a slow guest), ``ssh`` ("banner" or "silent"), ``cloud_init_delay``,
``shutdown_delay``, ``set_time_delay`` (seconds before ``guest-set-time`` answers, as
qemu-ga's RTC sync takes), ``snapshot_error``, ``migrate_error``, ``guest_files`` ({PATH: text}:
what ``guest-file-open`` finds for reading; without it the guest agent has no file
commands), ``exec`` ({PATH: {"exitcode",
"out"}}), and the triggers ``panic`` (GUEST_PANICKED, SHUTDOWN, exit), ``poweroff`` (the
guest powers itself off), ``reset`` (the guest reboots itself), ``io_error`` (a full
disk: BLOCK_IO_ERROR, STOP, status io-error) and ``die`` (exit 1 at once, no event).

The agent trusts a pid only if ``/proc/PID/cmdline`` names a ``qemu-system*`` program,
and a script run through ``#!/usr/bin/env python3`` shows there as ``python3``: install
this file with a shebang naming a symlink to Python called ``qemu-system-...``
(``tests/stub_helpers.py: install_stub``).

The guest agent's socket serves one client at a time, as qemu's chardev does: a second
connection is accepted and read once the first has closed; the guest agent answers the
requests in order, each to whoever is connected when its answer is ready.

Every command received is appended to ``stub-log.jsonl`` in the run dir (with the
events sent), and the pid of every stub started is appended to ``HOME/stub-pids``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

VERSION = (7, 2, 0)
CONTROL = "stub-control.json"
LOG = "stub-log.jsonl"
PIDS = "stub-pids"
NO_VALUE = {"-daemonize", "-nodefaults", "-no-user-config", "-S", "-no-reboot",
            "-no-shutdown", "-snapshot", "-enable-kvm"}


def opts(text: str) -> tuple[str, dict[str, str]]:
    """``kind,key=value,...`` (a doubled comma is a literal one)."""
    parts = [p.replace("\0", ",") for p in text.replace(",,", "\0").split(",")]
    kv = dict(p.split("=", 1) if "=" in p else (p, "") for p in parts[1:])
    return parts[0], kv


class Args:
    def __init__(self, argv: list[str]) -> None:
        self.name, self.pidfile, self.daemonize, self.incoming = "stub", None, False, None
        self.chardevs: dict[str, dict[str, str]] = {}
        self.mon = "qmp"
        self.mons: list[str] = []       # every -mon's chardev; the first is the agent's
        self.qga = "qga0"
        self.serial = "serial0"
        self.vnc: str | None = None
        self.ssh_port: int | None = None
        self.hostfwd = ""
        self.netdev = ""
        self.disk = ""
        self.removable: set[str] = set()
        i = 0
        while i < len(argv):
            a = argv[i]
            if a in NO_VALUE or i + 1 >= len(argv):
                self.daemonize |= a == "-daemonize"
                i += 1
                continue
            v, i = argv[i + 1], i + 2
            if a == "-name":
                self.name = opts(v)[0]
            elif a == "-pidfile":
                self.pidfile = v
            elif a == "-incoming":
                self.incoming = v
            elif a == "-chardev":
                _, kv = opts(v)
                self.chardevs[kv.get("id", "")] = kv
            elif a == "-mon":
                self.mons.append(opts("mon," + v)[1].get("chardev", "qmp"))
                self.mon = self.mons[0]
            elif a == "-serial" and v.startswith("chardev:"):
                self.serial = v.split(":", 1)[1]
            elif a == "-vnc" and v.startswith("unix:"):
                self.vnc = v.split(":", 1)[1]
            elif a == "-netdev":
                self.netdev = v
                m = re.search(r"hostfwd=(tcp:127\.0\.0\.1:(\d+)-:22)", v)
                if m:
                    self.hostfwd, self.ssh_port = m.group(1), int(m.group(2))
            elif a == "-drive":
                kv = opts("drive," + v)[1]
                if kv.get("node-name") == "hd0":
                    self.disk = kv.get("file", "")
            elif a == "-device":
                kind, kv = opts(v)
                if kind == "virtserialport" and "guest_agent" in kv.get("name", ""):
                    self.qga = kv.get("chardev", self.qga)
                if kind in ("scsi-cd", "ide-cd") and "id" in kv:
                    self.removable.add(kv["id"])

    def path(self, chardev: str) -> str | None:
        return self.chardevs.get(chardev, {}).get("path")


def home() -> Path | None:
    if os.environ.get("QEMU_STUB_HOME"):
        return Path(os.environ["QEMU_STUB_HOME"])
    prog = Path(sys.argv[0])
    return None if prog.name == "qemu_stub.py" else prog.resolve().parent


async def json_messages(reader):
    """The JSON objects a client sends: a stream, not lines (qemu.qmp sends no newline).
    Yields None for a message that cannot be parsed."""
    decoder, buf = json.JSONDecoder(), ""
    while data := await reader.read(65536):
        buf += data.decode("utf-8", "replace")
        while buf := buf.lstrip(" \t\r\n\xff\ufffd"):
            try:
                msg, end = decoder.raw_decode(buf)
            except ValueError:
                if buf.endswith("\n"):       # complete, yet not JSON
                    buf = ""
                    yield None
                break
            buf = buf[end:]
            yield msg if isinstance(msg, dict) else None


def record(run_dir: Path, **entry) -> None:
    try:
        with open(run_dir / LOG, "a") as f:
            f.write(json.dumps({"time": time.time(), **entry}) + "\n")
    except OSError:
        pass                    # the run dir was removed under a running qemu


def stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ()
    return st.st_ino, st.st_size, st.st_mtime_ns


def write_json(path: Path, doc: dict) -> None:
    """Atomically (a reader never sees a half-written control file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


class QMPError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls, self.desc = cls, desc


class Control:
    """The merged control files, re-read when one of them changes."""

    def __init__(self, run_dir: Path, name: str) -> None:
        h = home()
        self.files = ([h / CONTROL] if h else []) + [run_dir / CONTROL]
        self.name = name
        self._key: tuple = ()
        self._doc: dict = {}

    def _read(self, path: Path) -> dict:
        try:
            doc = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def get(self) -> dict:
        key = tuple(stat_key(f) for f in self.files)
        if key != self._key:
            doc: dict = {}
            for f in self.files:
                d = self._read(f)
                per_vm = d.pop("vms", {}).get(self.name, {})
                doc.update(d)
                doc.update(per_vm)
            self._key, self._doc = key, doc
        return self._doc

    def consume_fail(self) -> dict | None:
        """The ``fail_start`` that applies now, counted down where it was written."""
        for f in reversed(self.files):
            d = self._read(f)
            where = d.get("vms", {}).get(self.name, d)
            fail = where.get("fail_start")
            if not fail:
                continue
            if "times" in fail:
                if fail["times"] <= 0:
                    return None
                fail["times"] -= 1
                write_json(f, d)
            return fail
        return None


class Stub:
    def __init__(self, args: Args, run_dir: Path) -> None:
        self.args, self.run_dir = args, run_dir
        self.control = Control(run_dir, args.name)
        self.status = "inmigrate" if args.incoming else "running"
        self.running = asyncio.Event()
        self.actions = {"shutdown": "poweroff", "reboot": "reset", "panic": "shutdown"}
        self.clients: set[asyncio.StreamWriter] = set()
        self.jobs: dict[str, dict] = {}
        self.snapshots: list[dict] = []
        self.migration: dict = {}
        self.media: dict[str, str] = {}
        self.params: dict = {}
        self.execs: dict[int, dict] = {}
        self.qga_client = asyncio.Lock()   # qemu's chardev serves one client at a time
        self.qga_writer: asyncio.StreamWriter | None = None     # the one connected now
        self.qga_requests: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Future] = []   # what runs until the stub exits
        self.handles: dict[int, dict] = {}     # open guest-file handles
        self.fired: set[str] = set()
        self.boot_task: asyncio.Task | None = None
        self.exiting = False
        self.owned: dict[str, int] = {}        # files removed at a clean exit: inode
        log = args.chardevs.get(args.serial, {}).get("logfile")
        self.console = open(log, "ab") if log else None

    # --- records ----------------------------------------------------------------------

    def log(self, **entry) -> None:
        record(self.run_dir, **entry)

    def write_console(self, text: str) -> None:
        if self.console:
            self.console.write(text.encode())
            self.console.flush()

    def boot(self) -> None:
        """A (re)boot: the kernel's line now, cloud-init's after a delay."""
        if self.boot_task:
            self.boot_task.cancel()
        self.write_console("[    0.000000] Linux version 6.1.0-stub (stub@qemu-stub) "
                           "(gcc 12) #1 SMP PREEMPT_DYNAMIC\r\n")

        async def cloud_init() -> None:
            await asyncio.sleep(float(self.control.get().get("cloud_init_delay", 0.1)))
            stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
            self.write_console(f"[    1.234567] cloud-init[321]: Cloud-init v. 22.4 "
                               f"finished at {stamp}. Datasource DataSourceNoCloud "
                               "[seed=/dev/sr0].  Up 1.23 seconds\r\n")
        self.boot_task = asyncio.ensure_future(cloud_init())

    def set_status(self, status: str) -> None:
        self.status = status
        if status == "running":
            self.running.set()
        else:
            self.running.clear()

    # --- events and exits -------------------------------------------------------------

    def event(self, name: str, **data) -> None:
        now = time.time()
        msg = {"event": name, "data": data,
               "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        self.log(channel="event", event=name, data=data)
        line = (json.dumps(msg) + "\r\n").encode()
        for w in list(self.clients):
            if not w.is_closing():
                w.write(line)

    def exit(self, code: int = 0) -> None:
        if self.exiting:
            return
        self.exiting = True

        async def finish() -> None:
            for w in list(self.clients):
                try:
                    await asyncio.wait_for(w.drain(), 1)
                except Exception:  # noqa: BLE001 - the client went away
                    pass
            for path, ino in self.owned.items():     # not a successor's files
                try:
                    if os.stat(path).st_ino == ino:
                        os.unlink(path)
                except OSError:
                    pass
            os._exit(code)
        asyncio.ensure_future(finish())

    def shutdown(self, guest: bool, reason: str) -> None:
        """SHUTDOWN, then exit, or pause where ``set-action shutdown=pause``."""
        self.event("SHUTDOWN", guest=guest, reason=reason)
        if self.actions["shutdown"] == "pause":
            self.set_status("shutdown")
            self.event("STOP")
        else:
            self.exit(0)

    def guest_poweroff(self) -> None:
        self.write_console("[   10.000000] reboot: Power down\r\n")
        self.shutdown(True, "guest-shutdown")

    def reset(self, guest: bool) -> None:
        self.event("RESET", guest=guest,
                   reason="guest-reset" if guest else "host-qmp-system-reset")
        self.boot()
        if self.status not in ("running", "inmigrate"):
            self.set_status("prelaunch")

    def panic(self) -> None:
        self.write_console("[    5.000000] Kernel panic - not syncing: stub panic\r\n")
        self.event("GUEST_PANICKED", action="poweroff")
        self.event("SHUTDOWN", guest=True, reason="guest-panic")
        self.exit(0)

    def io_error(self) -> None:
        """The guest's disk is full: qemu pauses it (werror=enospc) and says why."""
        self.event("BLOCK_IO_ERROR", device="disk0", **{"node-name": "hd0"},
                   operation="write", action="stop", nospace=True,
                   reason="No space left on device")
        self.set_status("io-error")
        self.event("STOP")

    def later(self, delay_key: str, default: float, fn) -> None:
        asyncio.get_running_loop().call_later(
            float(self.control.get().get(delay_key, default)), fn)

    async def watch_control(self) -> None:
        while True:
            ctl = self.control.get()
            for trigger, act in (("die", lambda: os._exit(1)), ("panic", self.panic),
                                 ("poweroff", self.guest_poweroff),
                                 ("reset", lambda: self.reset(True)),
                                 ("io_error", self.io_error)):
                if ctl.get(trigger) and trigger not in self.fired:
                    self.fired.add(trigger)
                    act()
            await asyncio.sleep(0.05)

    # --- QMP --------------------------------------------------------------------------

    async def serve_qmp(self, reader, writer) -> None:
        major, minor, micro = VERSION
        greeting = {"QMP": {"version": {"qemu": {"major": major, "minor": minor,
                                                 "micro": micro}, "package": "(qemu-stub)"},
                            "capabilities": ["oob"]}}
        writer.write((json.dumps(greeting) + "\r\n").encode())
        negotiated = False
        try:
            async for msg in json_messages(reader):
                if msg is None:
                    writer.write(b'{"error": {"class": "GenericError", "desc": '
                                 b'"JSON parse error"}}\r\n')
                    continue
                cmd, args = msg.get("execute"), msg.get("arguments") or {}
                self.log(channel="qmp", execute=cmd, arguments=args)
                if self.control.get().get("hang"):
                    continue
                after = None
                try:
                    if cmd == "qmp_capabilities":
                        if negotiated:
                            raise QMPError("Capabilities negotiation is already complete,"
                                           " command ignored", "CommandNotFound")
                        negotiated, reply = True, {}
                        self.clients.add(writer)
                    elif not negotiated:
                        raise QMPError("Expecting capabilities negotiation with "
                                       "'qmp_capabilities'", "CommandNotFound")
                    else:
                        handler = getattr(self, "qmp_" + str(cmd).replace("-", "_"), None)
                        if handler is None:
                            raise QMPError(f"The command {cmd} has not been found",
                                           "CommandNotFound")
                        reply = await handler(**args)
                        if isinstance(reply, tuple):
                            reply, after = reply
                    out = {"return": reply}
                except QMPError as e:
                    out = {"error": {"class": e.cls, "desc": e.desc}}
                except (TypeError, KeyError, ValueError) as e:
                    out = {"error": {"class": "GenericError", "desc": f"invalid: {e!r}"}}
                if "id" in msg:
                    out["id"] = msg["id"]
                writer.write((json.dumps(out) + "\r\n").encode())
                await writer.drain()
                if after:
                    after()
        except (ConnectionError, OSError):
            pass
        finally:
            self.clients.discard(writer)

    async def qmp_query_status(self):
        return {"status": self.status, "running": self.status == "running",
                "singlestep": False}

    async def qmp_query_version(self):
        return {"qemu": dict(zip(("major", "minor", "micro"), VERSION)),
                "package": "(qemu-stub)"}

    async def qmp_quit(self):
        return {}, lambda: (self.event("SHUTDOWN", guest=False, reason="host-qmp-quit"),
                            self.exit(0))

    async def qmp_system_powerdown(self):
        self.event("POWERDOWN")
        if self.status == "running" and not self.control.get().get("ignore_powerdown"):
            self.later("shutdown_delay", 0.05, self.guest_poweroff)
        return {}

    async def qmp_system_reset(self):
        self.reset(False)
        return {}

    async def qmp_set_action(self, **actions):
        for key, value in actions.items():
            if key not in ("shutdown", "reboot", "panic", "watchdog"):
                raise QMPError(f"Parameter '{key}' is unexpected")
            self.actions[key] = value
        return {}

    async def qmp_stop(self):
        if self.status == "running":
            self.set_status("paused")
            self.event("STOP")
        return {}

    async def qmp_cont(self):
        if self.status in ("shutdown", "guest-panicked"):
            raise QMPError("Resetting the Virtual Machine is required")
        if self.status == "inmigrate":
            return {}               # qemu starts it once the incoming migration is done
        if self.status != "running":
            self.set_status("running")
            self.event("RESUME")
        return {}

    def _image(self) -> dict:
        image = {"filename": self.args.disk, "format": "qcow2", "virtual-size": 1 << 30}
        if self.snapshots:
            image["snapshots"] = self.snapshots
        return image

    async def qmp_query_named_block_nodes(self, flat: bool = False):
        return [{"node-name": "hd0", "drv": "qcow2", "file": self.args.disk, "ro": False,
                 "image": self._image()}]

    async def qmp_snapshot_save(self, tag, vmstate, devices, **kw):
        job_id = kw.pop("job-id")
        for node in [vmstate, *devices]:
            if node != "hd0":
                raise QMPError(f"Cannot find device='{node}' nor node-name='{node}'")
        if job_id in self.jobs:
            raise QMPError(f"Job ID '{job_id}' already in use")
        job = self.jobs[job_id] = {"id": job_id, "type": "snapshot-save",
                                   "status": "running", "current-progress": 0,
                                   "total-progress": 1}
        self.event("JOB_STATUS_CHANGE", id=job_id, status="running")

        def conclude() -> None:
            error = self.control.get().get("snapshot_error")
            if error:
                job["error"] = error
            else:
                self.snapshots.append({
                    "id": str(len(self.snapshots) + 1), "name": tag,
                    "vm-state-size": 1 << 20, "date-sec": int(time.time()),
                    "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0})
            job.update({"status": "concluded", "current-progress": 1})
            self.event("JOB_STATUS_CHANGE", id=job_id, status="concluded")
        self.later("snapshot_delay", 0.05, conclude)
        return {}

    async def qmp_query_jobs(self):
        return list(self.jobs.values())

    async def qmp_job_dismiss(self, id):
        job = self.jobs.get(id)
        if job is None:
            raise QMPError(f"Job not found: {id}")
        if job["status"] != "concluded":
            raise QMPError(f"Job '{id}' in state '{job['status']}' cannot accept command "
                           "verb 'dismiss'")
        del self.jobs[id]
        return {}

    async def qmp_blockdev_change_medium(self, filename, id=None, device=None, **kw):
        dev = id or device
        if dev not in self.args.removable:
            raise QMPError(f"Device '{dev}' not found", "DeviceNotFound")
        if not Path(filename).is_file():
            raise QMPError(f"Could not open '{filename}': No such file or directory")
        self.media[dev] = filename
        return {}

    async def qmp_migrate_set_parameters(self, **params):
        self.params.update(params)
        return {}

    async def _run_migration(self, uri: str, incoming: bool) -> None:
        self.migration = {"status": "active"}
        try:
            if not uri.startswith("exec:"):
                raise RuntimeError(f"stub: only exec: URIs, not {uri!r}")
            proc = await asyncio.create_subprocess_shell(
                uri[5:], stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            payload = b"" if incoming else (b"QEMU-STUB-VMSTATE " + self.args.name.encode()
                                            + b"\n" + os.urandom(4096))
            out, _ = await proc.communicate(payload)
            error = self.control.get().get("migrate_error")
            if proc.returncode != 0 or error:
                raise RuntimeError(error or f"exec exited {proc.returncode}")
            data = out if incoming else payload
            self.log(channel="migration", incoming=incoming, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest())
            self.migration = {"status": "completed"}
            if incoming:
                self.set_status("running")
                self.event("RESUME")
            else:
                self.set_status("postmigrate")
        except (OSError, RuntimeError) as e:
            self.migration = {"status": "failed", "error-desc": str(e)}

    async def qmp_migrate(self, uri, **kw):
        asyncio.ensure_future(self._run_migration(uri, incoming=False))
        return {}

    async def qmp_migrate_incoming(self, uri, **kw):
        if self.args.incoming != "defer":
            raise QMPError("'-incoming' was not specified on the command line")
        if self.migration:
            raise QMPError("The incoming migration has already been started")
        asyncio.ensure_future(self._run_migration(uri, incoming=True))
        return {}

    async def qmp_query_migrate(self):
        return dict(self.migration)

    # --- guest agent ------------------------------------------------------------------

    async def serve_qga(self, reader, writer) -> None:
        # like qemu's chardev socket: the next client is accepted (its connect
        # succeeds) but read only once the one before it has gone
        async with self.qga_client:
            self.qga_writer = writer
            try:
                async for msg in json_messages(reader):
                    if msg is None:
                        continue
                    cmd, args = msg.get("execute"), msg.get("arguments") or {}
                    self.log(channel="qga", execute=cmd, arguments=args)
                    ctl = self.control.get()
                    if ctl.get("hang") or ctl.get("guest_agent") == "silent":
                        continue
                    self.qga_requests.put_nowait(msg)
            except (ConnectionError, OSError, ValueError):
                pass
            finally:
                self.qga_writer = None
        writer.close()

    async def qga_worker(self) -> None:
        """The guest's qemu-ga: one request at a time, in the order received, each
        answer written to whoever is connected when it is ready (a client that left
        before its answer leaves it to the next one, as with the real channel)."""
        while True:
            msg = await self.qga_requests.get()
            await self.running.wait()           # a stopped guest answers nothing
            cmd, args = msg.get("execute"), msg.get("arguments") or {}
            ctl = self.control.get()
            delay = float(ctl.get("guest_agent_delay", 0))
            if cmd == "guest-set-time":         # qemu-ga's `hwclock -w` after the clock
                delay += float(ctl.get("set_time_delay", 0))
            if delay:
                await asyncio.sleep(delay)
            try:
                reply = self.qga_command(cmd, args)
                if reply is None:               # guest-shutdown answers nothing
                    continue
                out = {"return": reply}
            except QMPError as e:
                out = {"error": {"class": e.cls, "desc": e.desc}}
            if "id" in msg:
                out["id"] = msg["id"]
            writer = self.qga_writer
            if writer is None:
                continue
            # guest-sync-delimited's answer follows a 0xFF byte, as qemu-ga's does
            try:
                writer.write((b"\xff" if cmd == "guest-sync-delimited" else b"") +
                             (json.dumps(out) + "\n").encode())
                await writer.drain()
            except (ConnectionError, OSError):
                pass

    def qga_command(self, cmd: str, args: dict):
        if cmd in ("guest-sync", "guest-sync-delimited"):
            return args["id"]
        if cmd == "guest-ping":
            return {}
        if cmd == "guest-shutdown":
            self.guest_power(args.get("mode", "powerdown"))
            return None
        if cmd == "guest-exec":
            path, argv = args["path"], args.get("arg", [])
            result = self.control.get().get("exec", {}).get(path)
            if result is None:
                if path == "systemctl" and argv[:1] in (["poweroff"], ["reboot"]):
                    self.guest_power("reboot" if argv[0] == "reboot" else "powerdown")
                text = " ".join(argv)
                out = "reidentified\nrng-reseeded\n" if path == "/usr/bin/perl" else \
                    "accounts-synced\n" if "accounts-synced" in text else ""
                result = {"exitcode": 0, "out": out}
            pid = 1000 + len(self.execs)
            self.execs[pid] = {"exited": True, "exitcode": result.get("exitcode", 0),
                               "out-data": base64.b64encode(
                                   result.get("out", "").encode()).decode()}
            return {"pid": pid}
        if cmd == "guest-set-time":
            return {}
        if cmd == "guest-file-open":
            files = self.control.get().get("guest_files")
            if files is None:        # a guest agent without file commands (the default)
                raise QMPError(f"The command {cmd} has not been found", "CommandNotFound")
            handle = 100 + len(self.handles)
            path, mode = args["path"], args.get("mode", "r")
            if mode.startswith("r") and path not in files:
                raise QMPError(f"failed to open file '{path}': No such file")
            self.handles[handle] = {"path": path, "mode": mode, "pos": 0,
                                    "data": b"" if mode.startswith("w") else
                                    files[path].encode()}
            return handle
        if cmd == "guest-file-write":
            self.handles[args["handle"]]["data"] += base64.b64decode(args["buf-b64"])
            return {"count": len(base64.b64decode(args["buf-b64"])), "eof": False}
        if cmd == "guest-file-read":
            h = self.handles[args["handle"]]
            chunk = h["data"][h["pos"]:h["pos"] + args.get("count", 4096)]
            h["pos"] += len(chunk)
            return {"count": len(chunk), "buf-b64": base64.b64encode(chunk).decode(),
                    "eof": h["pos"] >= len(h["data"])}
        if cmd == "guest-file-close":
            self.handles.pop(args["handle"], None)
            return {}
        if cmd == "guest-exec-status":
            if args.get("pid") not in self.execs:
                raise QMPError("Invalid parameter 'pid'")
            return self.execs[args["pid"]]
        raise QMPError(f"The command {cmd} has not been found", "CommandNotFound")

    def guest_power(self, mode: str) -> None:
        if mode == "reboot":
            self.later("shutdown_delay", 0.05, lambda: self.reset(True))
        elif not self.control.get().get("ignore_powerdown"):
            self.later("shutdown_delay", 0.05, self.guest_poweroff)

    # --- console, VNC, SSH ------------------------------------------------------------

    async def serve_console(self, reader, writer) -> None:
        try:
            while data := await reader.read(4096):
                writer.write(data)
                if self.console:
                    self.console.write(data)
                    self.console.flush()
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def serve_vnc(self, reader, writer) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.read()

    async def serve_ssh(self, reader, writer) -> None:
        try:
            await self.running.wait()
            if self.control.get().get("ssh", "banner") == "banner":
                writer.write(b"SSH-2.0-stub\r\n")
                await writer.drain()
            while await reader.read(4096):
                pass
        except (ConnectionError, OSError):
            pass


def listen_unix(path: str) -> socket.socket:
    Path(path).unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    return s


def bind_all(args: Args, ctl: dict) -> dict[str, socket.socket]:
    socks = {}
    for key, path in (("qmp", args.path(args.mon)), ("console", args.path(args.serial)),
                      ("vnc", args.vnc), ("qga", args.path(args.qga))):
        if path and not (key == "qga" and ctl.get("guest_agent") == "absent"):
            socks[key] = listen_unix(path)
    for i, mon in enumerate(args.mons[1:]):     # the operator's monitor: QMP too
        if (path := args.path(mon)):
            socks[f"qmp{i + 1}"] = listen_unix(path)
    if args.ssh_port:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", args.ssh_port))
        except OSError:
            s.close()
            raise SystemExit(f"qemu-system-x86_64: -netdev {args.netdev}: Could not set up "
                             f"host forwarding rule '{args.hostfwd}'")
        s.listen(8)
        socks["ssh"] = s
    return socks


async def serve(stub: Stub, socks: dict[str, socket.socket]) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: (
        stub.event("SHUTDOWN", guest=False, reason="host-signal"), stub.exit(0)))
    handlers = {"qmp": stub.serve_qmp, "qga": stub.serve_qga, "vnc": stub.serve_vnc,
                "console": stub.serve_console, "ssh": stub.serve_ssh}
    for key, sock in socks.items():
        if sock.family == socket.AF_UNIX:
            handler = handlers["qmp" if key.startswith("qmp") else key]
            await asyncio.start_unix_server(handler, sock=sock)
        else:
            await asyncio.start_server(handlers[key], sock=sock)
    stub.tasks.append(asyncio.ensure_future(stub.qga_worker()))
    stub.set_status(stub.status)
    if stub.status == "running":
        stub.boot()
    await stub.watch_control()


def main(argv: list[str]) -> int:
    if "--version" in argv or "-version" in argv:
        print("QEMU emulator version %d.%d.%d (qemu-stub)" % VERSION)
        print("Copyright (c) nobody: a test stub")
        return 0
    args = Args(argv)
    run_dir = Path(os.curdir)     # relative: it follows the run dir when renamed
    control = Control(run_dir, args.name)
    fail = control.consume_fail()
    if fail:
        record(run_dir, channel="start", failed=fail, ssh_port=args.ssh_port)
        sys.stderr.write("qemu-system-x86_64: " + str(fail.get("message", "stub failure"))
                         .replace("{port}", str(args.ssh_port)) + "\n")
        return int(fail.get("exitcode", 1))
    socks = bind_all(args, control.get())
    ready_r, ready_w = os.pipe() if args.daemonize else (-1, -1)
    if args.daemonize:
        if os.fork() > 0:
            os.close(ready_w)
            for s in socks.values():
                s.close()
            ok = os.read(ready_r, 1) == b"\0"
            return 0 if ok else 1
        os.setsid()
        os.close(ready_r)
    pid = os.getpid()
    if args.pidfile:
        Path(args.pidfile).write_text(f"{pid}\n")
    if home() is not None:
        with open(home() / PIDS, "a") as f:
            f.write(f"{pid}\n")
    if args.daemonize:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.write(ready_w, b"\0")
        os.close(ready_w)
    stub = Stub(args, run_dir)
    for path in (args.pidfile, *(s.getsockname() for s in socks.values()
                                 if s.family == socket.AF_UNIX)):
        if path:
            stub.owned[str(Path(path).absolute())] = os.stat(path).st_ino
    asyncio.run(serve(stub, socks))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
