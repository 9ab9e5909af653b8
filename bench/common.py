"""Shared helpers of the benchmarks: a private agent in a private work directory, bare qemu
started by hand from the agent's dry run, SSH readiness polling, the machine description,
statistics, and cleanup of every process a benchmark started (found by its work
directory in the command line, killed by pid) even when the benchmark fails.

Every benchmark prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from agent_helpers import (IMAGE_DIR, AgentProcess, keypair,  # noqa: E402
                           process_running, ssh)

__all__ = ["ROOT", "IMAGE_DIR", "AgentProcess", "keypair", "process_running", "ssh",
           "machine", "median", "emit", "free_port", "vmctl", "kill_under", "workdir",
           "log", "ssh_banner", "wait_ready_bare", "ssh_login_retry", "BareVM",
           "BOOT_TIMEOUT", "Observer", "rss_kib", "cpu_seconds", "MinimalVM"]

BOOT_TIMEOUT = float(os.environ.get("VMCTL_BOOT_TIMEOUT", "900"))
# The same cadence as the agent path: the agent's watcher checks the SSH banner once a
# second (1.5 s connect/read timeout) and vmctl retries a failed login after 2 s.
BANNER_INTERVAL = 1.0
BANNER_TIMEOUT = 1.5
LOGIN_RETRY = 2.0


def log(*args: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


# --- the machine ----------------------------------------------------------------------

def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine(accel: str = "tcg") -> dict:
    """What the figures were taken on; call it at the start (it records the load)."""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "qemu": qemu, "accel": accel, "loadavg_at_start": loadavg()}


def median(xs: list[float], digits: int = 4) -> float | None:
    return round(statistics.median(xs), digits) if xs else None


def emit(doc: dict) -> None:
    doc["loadavg_at_end"] = loadavg()
    print(json.dumps(doc, indent=2))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of a process (and of its reaped children, with ``children``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


# --- cleanup --------------------------------------------------------------------------

def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _pids_naming(path: Path) -> list[int]:
    """Processes (other than this one) whose command line names ``path``."""
    needle = os.fsencode(str(path))
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            out.append(int(entry))
    return out


def kill_under(path: Path) -> list[int]:
    """SIGKILL every process whose command line names this benchmark's work directory
    (its qemus, a leftover agent), by pid, and wait until they are gone."""
    pids = _pids_naming(Path(path))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(process_running(p) for p in pids):
        time.sleep(0.1)
    return pids


@contextlib.contextmanager
def workdir(prefix: str, base: str | None = None) -> Iterator[Path]:
    """A private work directory; on the way out (also on an exception, Ctrl-C or
    SIGTERM) every process naming it is killed and it is removed."""
    old = signal.signal(signal.SIGTERM, _sigterm)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base)).resolve()
    try:
        yield path
    finally:
        try:
            killed = kill_under(path)
            if killed:
                log(f"cleanup: killed {len(killed)} leftover process(es) under {path}")
        finally:
            shutil.rmtree(path, ignore_errors=True)
            signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def running_agent(work: Path, import_image: bool = True) -> Iterator[AgentProcess]:
    agent = AgentProcess(work / "state").start()
    try:
        agent.register_key()
        if import_image:
            agent.import_test_image()
        yield agent
    finally:
        try:
            agent.stop()
        except Exception:  # noqa: BLE001 - the work dir cleanup kills it by pid
            pass


# --- SSH readiness --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_banner(port: int, timeout: float = BANNER_TIMEOUT) -> bool:
    """An SSH server greets on the port (qemu's user networking accepts connections
    before the guest listens, so a bare connect is not enough) - as the agent checks."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.makefile("rb").readline().startswith(b"SSH-")
    except OSError:
        return False


def ssh_login_retry(port: int, key: Path, deadline: float) -> tuple[float, int]:
    """``ssh ... true`` until it works (retrying a failure after LOGIN_RETRY seconds):
    (the monotonic time it worked, attempts)."""
    attempts = 0
    while True:
        attempts += 1
        try:
            ok = ssh(port, key, "true", timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if ok:
            return time.monotonic(), attempts
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SSH login on port {port}")
        time.sleep(LOGIN_RETRY)


def wait_ready_bare(port: int, key: Path, t0: float, alive: Callable[[], bool],
                    timeout: float = BOOT_TIMEOUT) -> dict:
    """Poll the SSH banner once a second, then log in: seconds since ``t0``."""
    deadline = time.monotonic() + timeout
    while not ssh_banner(port):
        if not alive():
            raise RuntimeError(f"qemu (ssh port {port}) exited while booting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SSH banner on port {port} within {timeout:g}s")
        time.sleep(BANNER_INTERVAL)
    banner = time.monotonic()
    done, attempts = ssh_login_retry(port, key, deadline)
    return {"banner_s": round(banner - t0, 2), "login_s": round(done - t0, 2),
            "login_attempts": attempts, "total_s": done - t0}


class Observer(threading.Thread):
    """Watches a console log file (4 Hz, read only: nothing the guest or the agent
    sees) and notes when the kernel banner and cloud-init's end appear; with
    ``ssh_ready`` (a callable, e.g. the agent's status), also when that first says
    True (polled once a second)."""

    PATTERNS = {"kernel_s": re.compile(rb"Linux version \d"),
                # the phases of a boot, for the per-phase profile (docs/performance.md)
                "userspace_s": re.compile(rb"systemd\[1\]: |Welcome to |Run /init"),
                "init_local_s": re.compile(rb"running 'init-local'"),
                "init_s": re.compile(rb"running 'init' at"),
                "sshd_started_s": re.compile(rb"Started .*(OpenBSD Secure Shell|ssh\.service)"),
                "modules_config_s": re.compile(rb"running 'modules:config'"),
                "modules_final_s": re.compile(rb"running 'modules:final'"),
                "cloud_init_done_s": re.compile(rb"Cloud-init v\. \S+ finished at")}

    def __init__(self, console_log: Path, t0: float,
                 ssh_ready: Callable[[], bool] | None = None) -> None:
        super().__init__(daemon=True)
        self.path, self.t0, self.ssh_ready = console_log, t0, ssh_ready
        self.seen: dict[str, float] = {}
        self._stop_evt = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self._stop_evt.wait(0.25):
            tick += 1
            now = round(time.monotonic() - self.t0, 2)
            try:
                data = self.path.read_bytes()
            except OSError:
                data = b""
            for key, pat in self.PATTERNS.items():
                if key not in self.seen and pat.search(data):
                    self.seen[key] = now
            if self.ssh_ready and "agent_ssh_ready_s" not in self.seen and tick % 4 == 0:
                with contextlib.suppress(Exception):
                    if self.ssh_ready():
                        self.seen["agent_ssh_ready_s"] = now

    def wait_for(self, key: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while key not in self.seen and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.25)

    def stop(self) -> dict:
        self._stop_evt.set()
        self.join(2)
        return dict(self.seen)


# --- vmctl ----------------------------------------------------------------------------

def vmctl_env(agent: AgentProcess) -> dict:
    """vmctl on this agent, with its own config dir (known_hosts) and runtime dir (SSH
    control sockets: the masters are cleaned up with the work dir) in the work dir."""
    conf = agent.state_dir.parent / "vmctl-config"
    run = agent.state_dir.parent / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return {**os.environ, "VMCTL_AGENT": f"unix://{agent.socket}",
            "XDG_CONFIG_HOME": str(conf), "XDG_RUNTIME_DIR": str(run)}


def vmctl(agent: AgentProcess, *args: str, check: bool = True,
          timeout: float = BOOT_TIMEOUT + 120) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "vmctl", *args], env=vmctl_env(agent),
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"vmctl {' '.join(args)} failed ({res.returncode}): "
                           f"{res.stderr[-2000:]}")
    return res


# --- bare qemu ------------------------------------------------------------------------

class BareVM:
    """One VM by hand: the agent's dry-run argv (same image, accel, memory, cpus, seed
    contents, devices and networking) with this VM's own run dir and SSH port."""

    def __init__(self, agent: AgentProcess, work: Path, name: str, spec: dict) -> None:
        doc = agent.ok("POST", "/vms", {"name": name, **spec, "dry_run": True})
        self.run_dir = work / name
        self.run_dir.mkdir()
        agent_dir = str((agent.state_dir / "vms" / name).resolve())
        fwd = next(a for a in doc["argv"] if "hostfwd=" in a)
        old = re.search(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-", fwd).group(1)
        self.port = free_port()
        self.argv = [a.replace(agent_dir, str(self.run_dir))
                     .replace(f"127.0.0.1:{old}-", f"127.0.0.1:{self.port}-")
                     for a in doc["argv"]]
        assert not any(agent_dir in a for a in self.argv)
        self.seed = {k: v.encode() for k, v in doc["seed"].items()}
        self._own_host_keys(name)
        self.disk_size = doc["spec"]["disk"]
        image = next(i for i in agent.ok("GET", "/images")["images"]
                     if i["name"] == doc["image"])
        self.base, self.base_format = image["path"], image["format"]
        self.pid: int | None = None

    def _own_host_keys(self, name: str) -> None:
        """A dry run shows placeholders where the agent puts the host keys it makes:
        make real ones (the same way: no key generation in the guest)."""
        import yaml
        from vmagent.identity import hostkeys
        from vmagent.identity import seed
        user_data = yaml.safe_load(self.seed["user-data"])
        if "ssh_keys" in user_data:
            real = hostkeys.cloud_config(hostkeys.generate(f"root@{name}"))
            by_path = {f["path"]: f for f in real["write_files"]}    # the public halves
            user_data["ssh_keys"] = real["ssh_keys"]
            user_data["write_files"] = [by_path.get(f.get("path"), f)
                                        for f in user_data["write_files"]]
            self.seed["user-data"] = seed.render_user_data(user_data)

    def start(self) -> None:
        """What the agent does for a create, by hand: overlay, seed ISO, qemu."""
        from vmagent.identity.seed import write_seed_iso
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", self.base_format,
                        "-b", self.base, str(self.run_dir / "disk.qcow2"),
                        str(self.disk_size)], check=True)
        write_seed_iso(self.run_dir / "seed.iso", self.seed)
        res = subprocess.run(self.argv, cwd=self.run_dir, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, start_new_session=True)
        if res.returncode != 0:
            raise RuntimeError(f"bare qemu failed ({res.returncode}): {res.stdout}"
                               f"{res.stderr}")
        self.pid = int((self.run_dir / "qemu.pid").read_text())

    def alive(self) -> bool:
        return self.pid is not None and process_running(self.pid)

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while process_running(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.pid = None
        shutil.rmtree(self.run_dir, ignore_errors=True)


class MinimalVM(BareVM):
    """The guest's own limit: the same kernel, initrd, append line, seed contents, MAC,
    disk overlay, RAM and vCPUs as the agent's VM, with qemu's default machine and CPU
    model, a virtio disk, the seed as a second virtio disk, a virtio NIC with the SSH
    forward, the serial port into a file (to watch the boot) and no other device."""

    def __init__(self, agent: AgentProcess, work: Path, name: str, spec: dict) -> None:
        super().__init__(agent, work, name, spec)
        full = self.argv

        def value(flag: str) -> str | None:
            return next((b for a, b in zip(full, full[1:]) if a == flag), None)
        mac = re.search(r"mac=([0-9a-f:]{17})", " ".join(full)).group(1)
        run = self.run_dir
        self.argv = [full[0], "-accel", "tcg", "-smp", value("-smp"), "-m", value("-m"),
                     "-nodefaults", "-no-user-config", "-display", "none",
                     "-daemonize", "-pidfile", str(run / "qemu.pid"),
                     "-serial", f"file:{run / 'console.log'}",
                     "-drive", f"file={run / 'disk.qcow2'},if=virtio,format=qcow2",
                     "-drive", f"file={run / 'seed.iso'},if=virtio,format=raw,readonly=on",
                     "-nic", f"user,model=virtio-net-pci,mac={mac},"
                             f"hostfwd=tcp:127.0.0.1:{self.port}-:22"]
        for flag in ("-kernel", "-initrd", "-append"):
            if value(flag) is not None:
                self.argv += [flag, value(flag)]
