"""CI agents against real qemu (warm clones of the session template): ``vmctl run``
with a small Python project (exit codes 0 and non-zero, artifacts, the job record),
SIGINT mid-job, a timeout, --keep-on-failure, an ephemeral VM whose guest powers off,
a warm pool of 2 that refills after a take, and the GitLab custom executor's stages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_helpers import ROOT, process_running, ssh, ssh_retry

pytestmark = pytest.mark.integration

PROJECT = ROOT / "tests" / "ci_project"
GITLAB = ROOT / "contrib" / "gitlab-executor"


@pytest.fixture(scope="module")
def ci(session_agent, session_template, tmp_path_factory):
    """An environment for vmctl: a HOME whose default key is the session's registered
    key, aimed at the session agent."""
    home = tmp_path_factory.mktemp("ci-home")
    (home / ".ssh").mkdir(mode=0o700)
    key = Path(session_agent.key)
    shutil.copy(key, home / ".ssh" / "id_ed25519")
    shutil.copy(key.with_suffix(".pub"), home / ".ssh" / "id_ed25519.pub")
    os.chmod(home / ".ssh" / "id_ed25519", 0o600)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "VMCTL_AGENT": session_agent.unix, "PYTHONPATH": str(ROOT)}
    return {"agent": session_agent, "template": session_template, "env": env,
            "home": home}


def vmctl(ci, *args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmctl", *args], env=ci["env"],
                          capture_output=True, text=True, timeout=timeout, **kw)


def vm_names(ci) -> list[str]:
    return [v["name"] for v in ci["agent"].ok("GET", "/vms?all=true")["vms"]]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:g}s")


def test_run_passes_the_exit_code_and_brings_back_artifacts(ci, tmp_path):
    arts = tmp_path / "arts"
    res = vmctl(ci, "run", "--json", "--template", ci["template"], "--copy", str(PROJECT),
                "--artifacts", "out", "--artifacts-dir", str(arts), "--timeout", "15m",
                "--", "./run-tests.sh")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    # under --json the job's output goes to stderr, the record alone to stdout
    assert "all tests passed" in res.stderr and "testing on job-" in res.stderr
    assert record["exit_code"] == 0 and record["vm"].startswith("job-")
    assert set(record["phases"]) == {"create_s", "run_s", "artifacts_s", "delete_s"}
    assert record["first_output_s"] > 0 and record["artifacts"]["ok"]
    assert "Ran 3 tests" in (arts / "out" / "report.txt").read_text()
    print(f"vmctl run from the template: {record['phases']}, first output "
          f"{record['first_output_s']}s")
    assert record["vm"] not in vm_names(ci)

    failed = vmctl(ci, "run", "--template", ci["template"], "--copy", str(PROJECT),
                   "--env", "CI_BREAK=1", "--", "./run-tests.sh")
    assert failed.returncode == 3, failed.stderr
    assert "broken on request" in failed.stderr          # streamed from the guest
    assert not [n for n in vm_names(ci) if n.startswith("job-")]


def test_keep_on_failure_keeps_the_vm_and_says_how_to_reach_it(ci):
    res = vmctl(ci, "run", "--template", ci["template"], "--keep-on-failure",
                "--name", "kept-job", "--", "echo about to fail; exit 9")
    try:
        assert res.returncode == 9, res.stderr
        assert "about to fail" in res.stdout
        assert "vmctl ssh kept-job" in res.stderr and "vmctl delete kept-job" in res.stderr
        st = ci["agent"].ok("GET", "/vms/kept-job")
        assert st["ephemeral"] and st["expires_at"] > time.time()
    finally:
        ci["agent"].call("DELETE", "/vms/kept-job")


def test_sigint_mid_job_leaves_no_vm(ci):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmctl", "run", "--name", "sigint-job", "--template",
         ci["template"], "--", "echo started; sleep 600"], env=ci["env"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started", proc.stderr.read()
        assert "sigint-job" in vm_names(ci)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "sigint-job" not in vm_names(ci)


def test_timeout_ends_the_job_and_deletes_the_vm(ci):
    t0 = time.monotonic()
    res = vmctl(ci, "run", "--name", "slow-job", "--template", ci["template"],
                "--timeout", "40", "--", "echo begun; sleep 600")
    assert res.returncode == 124, res.stderr
    assert "ran out of time" in res.stderr and "begun" in res.stdout
    assert time.monotonic() - t0 < 200
    assert "slow-job" not in vm_names(ci)


def test_ephemeral_vm_whose_guest_powers_off_is_gone(ci):
    agent = ci["agent"]
    st = agent.ok("POST", "/vms", {"name": "eph-off", "template": ci["template"],
                                   "ephemeral": True, "ttl": "1h"}, timeout=600)
    assert st["ephemeral"] and st["expires_at"]
    pid = st["pid"]
    assert ssh_retry(st["ssh_port"], agent.key, "true", user=st["ssh_user"]).returncode == 0
    res = ssh(st["ssh_port"], agent.key, "sudo poweroff", user=st["ssh_user"])
    assert res.returncode in (0, 255), res.stderr       # 255: the guest went first
    wait_until(lambda: not process_running(pid), 180, "the guest's poweroff")
    gone = time.monotonic()
    wait_until(lambda: "eph-off" not in vm_names(ci), 10, "the VM deleted")
    print(f"ephemeral VM deleted {time.monotonic() - gone:.2f}s after qemu exited")
    assert not (agent.state_dir / "vms" / "eph-off").exists()


def test_pool_of_two_refills_after_a_take(ci):
    agent = ci["agent"]
    res = vmctl(ci, "pool", "create", "cipool", "--template", ci["template"], "--size", "2")
    assert res.returncode == 0, res.stderr
    try:
        def ready(n):
            return lambda: agent.ok("GET", "/pools/cipool")["ready"] == n
        wait_until(ready(2), 900, "2 ready members")
        listing = vmctl(ci, "pool", "list")
        assert "cipool" in listing.stdout and " 2 " in listing.stdout
        t0 = time.monotonic()
        res = vmctl(ci, "run", "--json", "--pool", "cipool", "--", "hostname")
        wall = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        record = json.loads(res.stdout)
        assert res.stderr.strip().splitlines()[0] == record["vm"]    # its final name
        print(f"vmctl run from the pool: {wall:.2f}s wall, {record['phases']}, "
              f"first output {record['first_output_s']}s, hand-over "
              f"{record['handover']}")
        # the taken one is replaced
        wait_until(ready(2), 900, "the pool refilled to 2")
        took = vmctl(ci, "create", "from-pool", "--pool", "cipool", "--ttl", "1h")
        assert took.returncode == 0, took.stderr
        st = agent.ok("GET", "/vms/from-pool")
        res = ssh_retry(st["ssh_port"], agent.key, "hostname", user=st["ssh_user"])
        assert res.stdout.strip() == "from-pool"
        agent.ok("DELETE", "/vms/from-pool")
    finally:
        vmctl(ci, "pool", "rm", "cipool", "--yes")
    assert not [n for n in vm_names(ci) if n.startswith("cipool-")]


def test_gitlab_executor_stages_against_the_agent(ci, tmp_path):
    env = {**ci["env"], "CUSTOM_ENV_CI_JOB_ID": "4242", "CUSTOM_ENV_CI_PROJECT_NAME": "p",
           "VMCTL_GITLAB_TEMPLATE": ci["template"], "BUILD_FAILURE_EXIT_CODE": "71",
           "SYSTEM_FAILURE_EXIT_CODE": "72", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    # the stages call `vmctl`: this checkout's
    (tmp_path / "vmctl").write_text(f"#!/bin/sh\nexec {sys.executable} -m vmctl \"$@\"\n")
    os.chmod(tmp_path / "vmctl", 0o755)

    def stage(name, *args):
        return subprocess.run([str(GITLAB / f"{name}.sh"), *args], env=env,
                              capture_output=True, text=True, timeout=900)
    cfg = stage("config")
    assert cfg.returncode == 0, cfg.stderr
    assert json.loads(cfg.stdout)["driver"]["name"] == "vmctl"
    try:
        prep = stage("prepare")
        assert prep.returncode == 0, prep.stderr
        ok = tmp_path / "ok.sh"
        ok.write_text("echo stage-ran on $(hostname)\nexit 0\n")
        res = stage("run", str(ok), "build_script")
        assert res.returncode == 0, res.stderr
        assert "stage-ran on gitlab-4242" in res.stdout
        bad = tmp_path / "bad.sh"
        bad.write_text("echo failing\nexit 5\n")
        res = stage("run", str(bad), "build_script")
        assert res.returncode == 71, (res.returncode, res.stderr)
    finally:
        clean = stage("cleanup")
    assert clean.returncode == 0, clean.stderr
    assert "gitlab-4242" not in vm_names(ci)
    # a stage on a VM that is gone is a system failure
    res = stage("run", str(tmp_path / "ok.sh"), "build_script")
    assert res.returncode == 72, (res.returncode, res.stderr)
