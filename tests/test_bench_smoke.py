"""Every benchmark runs with a tiny setting and prints the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent_helpers import ROOT, require_test_image

pytestmark = pytest.mark.integration

EXPECT = {
    "seed_argv.py": {"seed_render_us", "seed_iso_write_us", "argv_build_us"},
    "disk_create.py": {"bases", "overlay_max_over_min"},
    "agent_cost.py": {"list_with_all_stopped", "list_with_running", "agent_rss_kib",
                      "agent_cpu_percent"},
    "create_to_ssh.py": {"agent_median", "bare_median", "ratio_median"},
    "parallel_create.py": {"all_at_once_s", "create_request_s_max", "per_vm_ssh_s"},
}


@pytest.mark.parametrize("script", sorted(EXPECT))
def test_benchmark_runs_quick(script):
    require_test_image()
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"],
                         capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert EXPECT[script] <= set(doc), sorted(doc)
    assert doc["machine"]["cores"] >= 1
