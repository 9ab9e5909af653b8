"""Image build jobs through a real agent, without building a whole image: requests the
agent refuses, and a build that fails (a package the mirror does not have) at its resolve
step, which must say so with the log's tail and leave nothing in the store. The resolve
step downloads the mirror's package lists (about 10 MB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_helpers import ROOT, AgentProcess

RECIPE = """name = "{name}"
description = "test recipe"
[build]
distribution = "debian"
suite = "bookworm"
disk_size = "2G"
packages = ["openssh-server", "no-such-package-for-vmagent"]
"""
PLAIN = ('name = "plain"\ndescription = "x"\nurl = "https://example.org/d.qcow2"\n'
         'format = "qcow2"\nsha256 = "' + "ab" * 32 + '"\n')


@pytest.fixture
def agent(tmp_path, monkeypatch):
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "broken.toml").write_text(RECIPE.format(name="broken"))
    (catalog / "plain.toml").write_text(PLAIN)
    monkeypatch.setenv("VMAGENT_BUILD_CACHE", str(tmp_path / "cache"))
    a = AgentProcess(tmp_path / "state", "--catalog", str(catalog)).start()
    yield a
    a.stop()


def test_requests_the_agent_refuses(agent):
    status, doc = agent.call("POST", "/images/plain/build", {})
    assert status == 400 and "has no [build] recipe" in doc["message"]
    status, doc = agent.call("POST", "/images/nothere/build", {})
    assert status == 404 and "not in the catalog" in doc["message"]
    status, doc = agent.call("GET", "/images/broken/build")
    assert status == 404 and "vmctl image build broken" in doc["message"]
    status, doc = agent.call("POST", "/images/broken/build", {"replace": "maybe"})
    assert status == 400 and "replace" in doc["message"]
    status, doc = agent.call("POST", "/images/broken/pull", {})
    assert status == 400 and "vmctl image build broken" in doc["message"]


@pytest.mark.skipif(os.geteuid() != 0, reason="builds run as root")
def test_a_failed_build_names_its_step_and_leaves_nothing(agent):
    env = {**os.environ, "VMCTL_AGENT": f"unix://{agent.socket}"}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "vmctl", "--json", "image", "build",
                          "broken"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    assert doc["error"] == "build_failed"
    assert "failed at step resolve" in doc["message"]
    assert "Unable to locate package no-such-package-for-vmagent" in doc["message"]
    build = doc["details"]["build"]
    assert build["state"] == "failed" and build["failed_step"] == "resolve"
    assert [s["state"] for s in build["steps"]] == ["done", "failed"]
    assert time.monotonic() - t0 < 300
    # nothing in the store, no work directory, no loop device or mount left behind
    assert agent.ok("GET", "/images")["images"] == []
    assert not (agent.state_dir / "builds/broken/work").exists()
    assert "FAILED at step resolve" in Path(build["log"]).read_text()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(agent.state_dir) not in mounts
    # the status stays readable after the agent restarts
    agent.stop()
    agent.start()
    assert agent.ok("GET", "/images/broken/build")["failed_step"] == "resolve"
