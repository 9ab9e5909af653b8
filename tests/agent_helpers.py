"""A real ``vmagent serve`` process and a small HTTP client: the one agent fixture of the
tests (API, CLI and integration tests all start their agents through it).

Cleanup kills only what a test started: the agent by its Popen, and the qemu processes
by the pids in the pidfiles under *its* state dir, each checked against
``/proc/PID/cmdline`` (never a pattern).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmagent.qemu.argv import owns_cmdline
from vmagent.qemu.machine import read_cmdline

ROOT = Path(__file__).resolve().parents[1]
IMAGE_DIR = Path(os.environ.get("VMCTL_TEST_IMAGE_DIR", "/var/cache/vm-test-image"))
# Generous: a TCG guest takes ~40-90 s to SSH on these machines, more when busy.
BOOT_TIMEOUT = float(os.environ.get("VMCTL_BOOT_TIMEOUT", "400"))
TOKEN = "test-token-0123456789abcdef"


def require_test_image() -> None:
    """Integration tests need the test image; missing it is a failure, not a skip."""
    for f in ("debian-12-test.qcow2", "vmlinuz", "initrd.img"):
        if not (IMAGE_DIR / f).is_file():
            pytest.fail(f"test image missing: {IMAGE_DIR / f} (build it with "
                        f"'./scripts/build-test-image {IMAGE_DIR}', which ./scripts/test "
                        "runs first)")


def free_port() -> int:
    """A free loopback port now (for a server of the test's own; the agent itself binds
    port 0 and reports its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str | Path, timeout: float = 60) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class AgentProcess:
    """``vmagent serve`` on ``state_dir`` (TCG); with ``token``, also on TCP (port 0)."""

    def __init__(self, state_dir: Path, *extra: str, token: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.env = env
        self.socket = self.state_dir / "vmagent.sock"
        self.extra = extra
        self.token = token
        self.token_file: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log = self.state_dir.parent / f"{self.state_dir.name}-agent.log"

    @property
    def unix(self) -> str:
        return f"unix://{self.socket}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "AgentProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        extra = list(self.extra)
        if self.token:
            self.token_file = self.state_dir.parent / f"{self.state_dir.name}-token"
            self.token_file.write_text(self.token + "\n")
            self.token_file.chmod(0o600)
            extra += ["--listen", "127.0.0.1:0", "--token-file", str(self.token_file)]
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmagent.cli", "serve", "--state-dir",
             str(self.state_dir), "--accel", "tcg", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
            env={**os.environ, **self.env} if self.env else None)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline().decode()
                if "ready" in line:
                    if m := re.search(r"https?://127\.0\.0\.1:(\d+)", line):
                        self.port = int(m.group(1))
                    return self
        self.stop()
        raise RuntimeError(f"vmagent did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def qemu_pids(self) -> list[int]:
        """The running qemu processes of this agent's VMs and template builds."""
        pids = []
        for pidfile in self.state_dir.glob("**/qemu.pid"):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            if owns_cmdline(read_cmdline(pid), pidfile.parent):
                pids.append(pid)
        return pids

    def cleanup(self) -> None:
        """Stop the agent and kill the qemu processes it started (by pid), then remove
        the cgroups it made for them (under its own parent, vmagent/alloc/service.py)."""
        self.stop()
        pids = self.qemu_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        remove_cgroups(self.state_dir, pids)

    # --- HTTP -------------------------------------------------------------------------

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 300) -> tuple[int, str, bytes]:
        conn = UnixHTTPConnection(self.socket, timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type", ""), resp.read()
        finally:
            conn.close()

    def call(self, method: str, path: str, body: dict | None = None,
             timeout: float = 300) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        status, ctype, raw = self.raw(method, "/v1" + path, data,
                                      {"Content-Type": "application/json"} if data else {},
                                      timeout)
        assert ctype.startswith("application/json"), (status, ctype, raw[:200])
        return status, json.loads(raw or b"{}")

    def ok(self, method: str, path: str, body: dict | None = None, **kw) -> dict:
        status, doc = self.call(method, path, body, **kw)
        assert 200 <= status < 300, (method, path, status, doc)
        return doc

    def register_key(self) -> Path:
        """A new key pair for the caller (this process's user), registered with the agent
        (creates refuse a VM nobody could log in to); its private key's path."""
        key = self.state_dir.parent / f"{self.state_dir.name}-key"
        if not key.exists():
            keypair(key.parent, key.name)
        self.ok("POST", "/keys", {"keys": key.with_suffix(".pub").read_text()})
        self.key = key
        return key

    def import_test_image(self, name: str = "test") -> dict:
        return self.ok("POST", "/images", {
            "image": name, "path": str(IMAGE_DIR / "debian-12-test.qcow2"),
            "kernel": str(IMAGE_DIR / "vmlinuz"), "initrd": str(IMAGE_DIR / "initrd.img"),
            "append": "root=LABEL=rootfs console=ttyS0 rw no_timer_check"})

    def wait_ready(self, name: str, timeout: float = BOOT_TIMEOUT,
                   cloud_init: bool = False) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.ok("GET", f"/vms/{name}")
            if st["ssh_ready"] and (not cloud_init or st["cloud_init"] == "done"):
                return st
            assert st["state"] == "running", st
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not ready after {timeout:g}s: {st}")
            time.sleep(1)

    def wait_state(self, name: str, want: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while (st := self.ok("GET", f"/vms/{name}"))["state"] != want:
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        return st


def remove_cgroups(state_dir: Path, pids: list[int], timeout: float = 10) -> None:
    """The VM cgroups of the agent on ``state_dir`` (its default parent in each cgroup
    hierarchy), once the processes in ``pids`` are gone."""
    try:
        from vmagent.alloc.service import default_parent
    except ImportError:             # an installed vmagent from before cgroups
        return
    deadline = time.monotonic() + timeout
    while any(process_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    parent = default_parent(state_dir)
    for hierarchy in Path("/sys/fs/cgroup").glob(f"*/{parent}"):
        for leaf in [d for d in hierarchy.iterdir() if d.is_dir()]:
            try:
                leaf.rmdir()
            except OSError:
                pass
        try:
            hierarchy.rmdir()
        except OSError:
            pass
    unified = Path("/sys/fs/cgroup") / parent      # a cgroup v2 host
    if (unified / "cgroup.procs").exists():
        for leaf in [d for d in unified.iterdir() if d.is_dir()] + [unified]:
            try:
                leaf.rmdir()
            except OSError:
                pass


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed qemu is a zombie until its
    parent, init, reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def ssh(port: int, key: Path, *command: str, user: str = "dev",
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", f"{user}@127.0.0.1",
         *command], capture_output=True, text=True, timeout=timeout)


def ssh_retry(port: int, key: Path, *command: str, attempts: int = 10,
              **kw) -> subprocess.CompletedProcess:
    """SSH answers a moment before the user's key is installed: retry auth failures."""
    for _ in range(attempts):
        res = ssh(port, key, *command, **kw)
        if res.returncode != 255:
            return res
        time.sleep(3)
    return res


def keypair(directory: Path, name: str = "id_ed25519") -> Path:
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True)
    return key
