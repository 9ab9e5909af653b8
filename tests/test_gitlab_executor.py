"""The GitLab custom executor driver (contrib/gitlab-executor/): its stages called as
the runner's protocol documents them (arguments, CUSTOM_ENV_* variables, the
BUILD_FAILURE_EXIT_CODE / SYSTEM_FAILURE_EXIT_CODE exit codes). A fake ``vmctl`` on
PATH records its arguments and answers with chosen exit codes: these tests check the
protocol only; tests/test_ci_integration.py runs the stages against a real agent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "contrib" / "gitlab-executor"

FAKE = r"""#!/bin/sh
# records "vmctl ARGS" (and what it read on stdin for ssh), exits $FAKE_RC_<command>
log="$FAKE_LOG"
printf '%s\n' "$*" >> "$log"
cmd="$1"
[ "$cmd" = "-H" ] && cmd="$3"
if [ "$cmd" = ssh ] && [ "${FAKE_STDIN:-}" = 1 ]; then
    printf 'stdin: %s\n' "$(cat)" >> "$log"
fi
eval "rc=\${FAKE_RC_$cmd:-0}"
exit "$rc"
"""


@pytest.fixture
def stage(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vmctl").write_text(FAKE)
    (bin_dir / "vmctl").chmod(0o755)
    log = tmp_path / "vmctl.log"

    def call(name: str, *args: str, **env: str):
        full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
                "CUSTOM_ENV_CI_JOB_ID": "1234", "BUILD_FAILURE_EXIT_CODE": "71",
                "SYSTEM_FAILURE_EXIT_CODE": "72", **env}
        log.write_text("")
        res = subprocess.run([str(DRIVER / f"{name}.sh"), *args], env=full,
                             capture_output=True, text=True, timeout=30)
        res.calls = log.read_text().splitlines()
        return res
    return call


def test_config_prints_the_runner_its_json(stage):
    res = stage("config")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["builds_dir"].startswith("/") and doc["cache_dir"].startswith("/")
    assert doc["builds_dir_is_shared"] is False and doc["hostname"] == "gitlab-1234"
    assert doc["driver"]["name"] == "vmctl" and doc["job_env"] == {
        "VMCTL_GITLAB_VM": "gitlab-1234"}
    assert res.calls == []


@pytest.mark.parametrize("name", ["config", "prepare", "run", "cleanup"])
def test_a_stage_without_a_job_id_is_a_system_failure(stage, name):
    res = stage(name, CUSTOM_ENV_CI_JOB_ID="")
    assert res.returncode == 72 and "CUSTOM_ENV_CI_JOB_ID" in res.stderr


def test_prepare_creates_an_ephemeral_vm_with_a_ttl(stage):
    res = stage("prepare", VMCTL_GITLAB_TEMPLATE="ci-tpl", VMCTL_GITLAB_TTL="90m")
    assert res.returncode == 0, res.stderr
    assert res.calls[0] == "delete gitlab-1234 --yes"
    assert res.calls[1] == ("create gitlab-1234 --template=ci-tpl --ephemeral --ttl 90m "
                            "--quiet")
    assert res.calls[2].startswith("ssh gitlab-1234 -- mkdir -p /tmp/gitlab/builds")
    pool = stage("prepare", VMCTL_GITLAB_POOL="ci", VMCTL_GITLAB_HOST="lab")
    assert pool.returncode == 0, pool.stderr
    assert pool.calls[1] == ("-H lab create gitlab-1234 --pool=ci --ephemeral --ttl 3h "
                             "--quiet")


def test_prepare_failures_are_system_failures_and_leave_no_vm(stage):
    res = stage("prepare")
    assert res.returncode == 72 and "VMCTL_GITLAB_TEMPLATE" in res.stderr
    res = stage("prepare", VMCTL_GITLAB_TEMPLATE="t", FAKE_RC_create="4")
    assert res.returncode == 72 and res.calls[-1] == "delete gitlab-1234 --yes"
    res = stage("prepare", VMCTL_GITLAB_TEMPLATE="t", FAKE_RC_ssh="255")
    assert res.returncode == 72 and res.calls[-1] == "delete gitlab-1234 --yes"


def test_run_gets_the_script_and_the_stage_and_maps_exit_codes(stage, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("echo from-the-runner\n")
    res = stage("run", str(script), "build_script", FAKE_STDIN="1")
    assert res.returncode == 0, res.stderr
    assert res.calls == ["ssh gitlab-1234 -- bash -s", "stdin: echo from-the-runner"]
    code_file = tmp_path / "code"
    res = stage("run", str(script), "build_script", FAKE_RC_ssh="5",
                BUILD_EXIT_CODE_FILE=str(code_file))
    assert res.returncode == 71 and "stage build_script failed (exit 5)" in res.stderr
    assert code_file.read_text().strip() == "5"
    for vmctl_failure in ("255", "3", "6"):
        res = stage("run", str(script), "step_script", FAKE_RC_ssh=vmctl_failure)
        assert res.returncode == 72, (vmctl_failure, res.stderr)
    res = stage("run", str(tmp_path / "missing.sh"), "build_script")
    assert res.returncode == 72 and res.calls == []


def test_cleanup_always_succeeds(stage):
    for rc in ("0", "3", "6"):
        res = stage("cleanup", FAKE_RC_delete=rc)
        assert res.returncode == 0 and res.calls == ["delete gitlab-1234 --yes"]
