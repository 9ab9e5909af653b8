"""Fixtures for the vmctl tests: a real vmagent process (unix socket + token TCP).

Imported by the tests/test_cli_*.py modules (``from cli_helpers import *``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent_helpers import IMAGE_DIR, ROOT, TOKEN, AgentProcess, free_port  # noqa: F401
from sshd_helpers import SSHD, keygen as _keygen, start_sshd  # noqa: F401
from vmctl.main import cli

TEST_IMAGE_DIR = IMAGE_DIR
TEST_IMAGE = TEST_IMAGE_DIR / "debian-12-test.qcow2"
GOLDEN_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdM09Ct5ZbpGEQm6BvLA/Ji8N4McDg7RPn/"
              "6+OGhCmD golden@vmctl")
ENV_VARS = ("VMCTL_AGENT", "VMCTL_CONFIG", "VMCTL_TOKEN", "VMCTL_TOKEN_FILE", "VMCTL_DEBUG")

# the dry run of the golden files (tests/golden/create_dry_run.*)
DRY = ["create", "gold1", "--image", "test", "--cpus", "1", "--memory", "512M",
       "--disk", "4G", "--admin", "alice", "--segment", "default", "--dry-run"]


def golden_key(home: Path) -> Path:
    path = home / "golden.pub"
    path.write_text(GOLDEN_KEY + "\n")
    return path


def start_agent(base: Path) -> AgentProcess:
    """An agent on ``base/state``: its unix socket and a token-protected TCP port."""
    return AgentProcess(base / "state", token=TOKEN).start()


def stop_agent(agent: AgentProcess) -> None:
    agent.cleanup()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private HOME (keys, config, known_hosts) and a clean vmctl environment."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def agent(tmp_path_factory):
    """One agent for the session, with the test image imported as ``test``."""
    base = tmp_path_factory.mktemp("agent")
    a = start_agent(base)
    try:
        # alice, an admin in the dry runs, has a key in the registry
        a.ok("POST", "/keys", {"user": "alice", "keys": GOLDEN_KEY})
        yield a
    finally:
        stop_agent(a)


@pytest.fixture
def run(home):
    """``run(*args, input=None)`` -> click Result, stdout and stderr kept apart."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None, env: dict | None = None):
        return runner.invoke(cli, [str(a) for a in args], input=input, env=env,
                             catch_exceptions=False)
    return invoke


@pytest.fixture
def local(agent, run, monkeypatch):
    """``run`` aimed at the session agent's unix socket through VMCTL_AGENT."""
    monkeypatch.setenv("VMCTL_AGENT", agent.unix)
    return run


def ensure_test_image(run) -> None:
    """Import the test image once per agent (through ``vmctl image import``)."""
    listing = json.loads(run("--json", "image", "list").stdout)
    if any(i["name"] == "test" for i in listing["images"]):
        return
    if not TEST_IMAGE.is_file():
        pytest.fail(f"{TEST_IMAGE} is missing (./scripts/test builds it)")
    result = run("--json", "image", "import", TEST_IMAGE, "--name", "test",
                 "--kernel", TEST_IMAGE_DIR / "vmlinuz", "--initrd",
                 TEST_IMAGE_DIR / "initrd.img")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["name"] == "test" and doc["boot"] == "kernel"


def normalize(text: str, agent: AgentProcess) -> str:
    """Replace what differs between runs: paths, MAC, ports, ids."""
    text = text.replace(str(agent.state_dir), "$STATE")
    # the agent picks a random MAC; when its last three octets are all decimal below 60
    # (about 1.3% of MACs: 52:54:00:12:34:56) YAML quotes it in network-config, because
    # unquoted it would read as a base-60 integer: both spellings are the same MAC here
    text = re.sub(r"'?52:54:00(:[0-9a-f]{2}){3}'?", "52:54:00:XX:XX:XX", text)
    text = re.sub(r"hostfwd=tcp:127\.0\.0\.1:\d+-", "hostfwd=tcp:127.0.0.1:PORT-", text)
    text = re.sub(r"guid=[0-9a-f-]{36}", "guid=GUID", text)
    text = re.sub(r"(instance-id: [a-z0-9-]+?)-[0-9a-f]{8,}", r"\1-ID", text)
    # the agent's name defaults to the hostname; its cgroup parent to one of its state dir
    text = re.sub(r'"host": "[^"]*"', '"host": "HOST"', text)
    text = re.sub(r"/vmagent-[0-9a-f]{8}/", "/vmagent-STATE/", text)
    text = re.sub(r"# allocation on \S+:", "# allocation on HOST:", text)
    # which cgroups enforce depends on the host (v1 here)
    text = re.sub(r'"enforcement": "\w+"', '"enforcement": "CGROUPS"', text)
    text = re.sub(r"\((v1|v2|none)\)$", "(CGROUPS)", text, flags=re.M)
    return text


def check_golden(name: str, text: str) -> None:
    path = ROOT / "tests" / "golden" / name
    if os.environ.get("VMCTL_UPDATE_GOLDEN") or not path.exists():
        path.write_text(text)
        if not os.environ.get("VMCTL_UPDATE_GOLDEN"):
            pytest.fail(f"golden file {path} was missing and has been written; check it in")
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            str(path), "this run"))
        pytest.fail(f"differs from {path} (VMCTL_UPDATE_GOLDEN=1 rewrites):\n{diff}")


# --- a private sshd on localhost ----------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """sshd on 127.0.0.1:PORT with a temp host key; ``client_key`` may log in as root."""
    d = tmp_path_factory.mktemp("sshd")
    client_pub = _keygen(d / "client_key")
    proc, port, host_pub, sshd_dir = start_sshd({"root": client_pub})
    yield {"port": port, "dir": d, "host_pub": host_pub}
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(sshd_dir, ignore_errors=True)


@pytest.fixture
def ssh_home(home, sshd):
    """HOME with the client key and the sshd's host key in known_hosts."""
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    shutil.copy(sshd["dir"] / "client_key", ssh_dir / "id_ed25519")
    shutil.copy(sshd["dir"] / "client_key.pub", ssh_dir / "id_ed25519.pub")
    kind, key = sshd["host_pub"].split()[:2]
    (ssh_dir / "known_hosts").write_text(f"[127.0.0.1]:{sshd['port']} {kind} {key}\n")
    return home


def ssh_address(sshd, agent: AgentProcess) -> str:
    return f"ssh://root@127.0.0.1:{sshd['port']}{agent.socket}"
