"""A real vmagent process and a small HTTP client for the integration tests."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE_DIR = Path(os.environ.get("VMCTL_TEST_IMAGE_DIR", "/var/cache/vm-test-image"))
# Generous: a TCG guest takes ~40-90 s to SSH on these machines, more when busy.
BOOT_TIMEOUT = float(os.environ.get("VMCTL_BOOT_TIMEOUT", "400"))


def require_test_image() -> None:
    """Integration tests need the test image; missing it is a failure, not a skip."""
    for f in ("debian-12-test.qcow2", "vmlinuz", "initrd.img"):
        if not (IMAGE_DIR / f).is_file():
            pytest.fail(f"test image missing: {IMAGE_DIR / f} (build it with "
                        "../shared/tools/build-test-image)")


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class AgentProcess:
    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.state_dir = Path(state_dir)
        self.socket = self.state_dir / "vmagent.sock"
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log = self.state_dir.parent / f"{self.state_dir.name}-agent.log"

    def start(self) -> "AgentProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmagent.cli", "serve", "--state-dir",
             str(self.state_dir), "--accel", "tcg", *self.extra],
            stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                if b"ready" in self.proc.stdout.readline():
                    return self
        raise RuntimeError(f"vmagent did not start: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def call(self, method: str, path: str, body: dict | None = None,
             timeout: float = 300) -> tuple[int, dict]:
        conn = _UnixHTTP(str(self.socket), timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, "/v1" + path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def ok(self, method: str, path: str, body: dict | None = None, **kw) -> dict:
        status, doc = self.call(method, path, body, **kw)
        assert status < 300, (status, doc)
        return doc

    def import_test_image(self, name: str = "test") -> dict:
        return self.ok("POST", "/images", {
            "image": name, "path": str(IMAGE_DIR / "debian-12-test.qcow2"),
            "kernel": str(IMAGE_DIR / "vmlinuz"), "initrd": str(IMAGE_DIR / "initrd.img"),
            "append": "root=/dev/vda console=ttyS0 rw"})

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
