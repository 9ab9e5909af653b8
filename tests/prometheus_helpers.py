"""A real Prometheus server (Debian's ``prometheus`` package) for the monitoring tests:
its own config (one scrape job: an agent's ``/v1/metrics`` once a second with a bearer
token file), its own storage dir, its own port; stopped by its PID. And the operator's
QMP monitor of a VM (``qmp-operator.sock``), to drive qemu while the agent holds
``qmp.sock``."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent_helpers import free_port
from vmagent import rundir
from vmagent.qemu.qmp import Monitor

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def require_prometheus() -> None:
    for tool in (PROMETHEUS, PROMTOOL):
        if not Path(tool).exists():
            pytest.fail(f"{tool} missing: apt-get install -y prometheus")


class PrometheusServer:
    def __init__(self, base: Path, target: str, token_file: Path) -> None:
        self.base = Path(base)
        self.port = free_port()
        self.config = self.base / "prometheus.yml"
        self.config.write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: vmagent
    metrics_path: /v1/metrics
    authorization:
      type: Bearer
      credentials_file: {token_file}
    static_configs:
      - targets: ["{target}"]
""")
        self.log = self.base / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "PrometheusServer":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.base / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()           # by its PID (Popen)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.base / "data", ignore_errors=True)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", doc
        return doc["data"]

    def value(self, query: str) -> float | None:
        """The instant value of a query that yields one series (None: no series)."""
        result = self.api("query", query=query)["result"]
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def wait(self, query: str, want: float, timeout: float) -> float:
        """Seconds until ``query`` reads ``want`` (AssertionError after ``timeout``)."""
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < timeout:
            last = self.value(query)
            if last == want:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"{query} is {last}, not {want}, after {timeout:g}s")


def operator_qmp(run_dir: str | Path, command: str, arguments: dict | None = None) -> Any:
    """One command on the VM's operator QMP monitor."""
    async def go() -> Any:
        mon = Monitor(Path(run_dir) / rundir.QMP_OPERATOR_SOCK, "test-operator")
        await mon.connect(10)
        try:
            return await mon.execute(command, arguments, 30)
        finally:
            await mon.close()
    return asyncio.run(go())
