"""Every benchmark runs with a tiny setting (--quick), prints the JSON it promises and
leaves no process or file behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent_helpers import ROOT, require_test_image

pytestmark = pytest.mark.integration

EXPECT = {
    "seed_argv.py": {"seed_render_us", "seed_iso_write_us", "seed_build_us",
                     "argv_build_us", "dry_run_request_ms"},
    "disk_create.py": {"bases", "overlay_max_over_min", "goal_met"},
    "agent_cost.py": {"list_with_all_stopped", "list_with_running", "agent_rss_kib",
                      "agent_cpu_seconds", "agent_cpu_percent"},
    "create_to_ssh.py": {"agent_median", "minimal_median", "ratio_median",
                         "ratio_of_medians", "profile_median_s", "runs_detail"},
    "parallel_create.py": {"all_at_once_s", "bare_all_at_once_s", "create_request_s_max",
                           "qemu_start_spread_s", "per_vm_ssh_s"},
    "qemu_overhead.py": {"points_mib", "overhead_mib", "overhead_max_mib", "oom_kills"},
    "monitor_cost.py": {"agent_cpu_percent", "per_vm_cpu_percent", "at_100_vms_cpu_percent",
                        "broken_after_kill_s", "goal_broken_met"},
    "ci_throughput.py": {"cold_jobs_per_minute", "template_jobs_per_minute",
                         "pool_jobs_per_minute", "pool_first_output_s",
                         "template_first_output_s", "template_parallel2", "pool_parallel2",
                         "goal_met"},
    "warm_start.py": {"cold_seconds", "template_create_seconds", "warm_vmctl_median",
                      "warm_api_median", "warm_over_cold", "warm_api_detail"},
}


def _pids_naming(path: Path) -> list[int]:
    needle = os.fsencode(str(path))
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture
def short_tmp():
    # a short TMPDIR: the agent's unix socket path must stay under 108 bytes
    path = Path(tempfile.mkdtemp(prefix="vmb-")).resolve()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("script", sorted(EXPECT))
def test_benchmark_runs_quick(script, short_tmp):
    require_test_image()
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"],
                         capture_output=True, text=True, timeout=1500, cwd=ROOT,
                         env={**os.environ, "TMPDIR": str(short_tmp)})
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert EXPECT[script] <= set(doc), sorted(doc)
    assert doc["machine"]["cores"] >= 1
    assert len(doc["machine"]["loadavg_at_start"]) == 3
    assert len(doc["loadavg_at_end"]) == 3
    # everything it started is gone: no process names its work dir, no dir is left
    assert _pids_naming(short_tmp) == []
    assert list(short_tmp.iterdir()) == []
