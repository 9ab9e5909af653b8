"""Real enforcement with real guests (cgroup v1 on these machines): a VM whose vCPUs all
spin uses at most about its cpu_limit, measured from its cgroup's CPU accounting, and
more once the limit is raised (push_config, applied to the running VM at once); a VM's
ram_limit is its cgroup's memory limit, and a normal boot fits under it (qemu is not
killed, nothing hits the limit). The figures are printed (``-s``) for
docs/allocation.md."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent_helpers import BOOT_TIMEOUT, ssh_retry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

WINDOW = 20.0          # seconds of CPU accounting per measurement
SPIN = ("nohup sh -c 'for i in $(seq $(nproc)); do (while :; do :; done) & done; wait' "
        "> /dev/null 2>&1 < /dev/null &")


def cgroup_dir(status: dict, controller: str) -> Path:
    dirs = [Path(d) for d in status["allocation"]["cgroup_dirs"]]
    found = [d for d in dirs if d.parts[-3].startswith(controller)
             and controller in d.parts[-3].split(",")]
    assert found, dirs
    return found[0]


def throttled(cpu: Path) -> int:
    """Periods in which the cgroup used up its quota (cpu.stat nr_throttled)."""
    stat = dict(line.split() for line in (cpu / "cpu.stat").read_text().splitlines())
    return int(stat["nr_throttled"])


def cores_used(acct: Path, window: float) -> float:
    """Cores used on average over ``window`` seconds, from cpuacct.usage (ns)."""
    u0, t0 = int((acct / "cpuacct.usage").read_text()), time.monotonic()
    time.sleep(window)                  # the measurement window itself
    u1, t1 = int((acct / "cpuacct.usage").read_text()), time.monotonic()
    return (u1 - u0) / 1e9 / (t1 - t0)


def test_cpu_limit_caps_a_busy_vm_and_raising_it_applies_at_once(session_agent, warm_vm):
    agent = session_agent
    st = warm_vm(segment="default", cpu_guarantee=0.5, cpu_limit=0.5)
    status = agent.ok("GET", f"/vms/{st['name']}")
    assert status["allocation"]["enforcement"] == "v1"
    cpu, acct = cgroup_dir(status, "cpu"), cgroup_dir(status, "cpuacct")
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
    pid = status["pid"]
    where = Path(f"/proc/{pid}/cgroup").read_text()
    assert f":cpu:{status['allocation']['cgroup']}\n" in where
    res = ssh_retry(st["ssh_port"], agent.key, SPIN, user=st["ssh_user"])
    assert res.returncode == 0, res.stderr
    # the loops are spinning once a short window shows the VM at its ceiling
    deadline = time.monotonic() + 120
    while cores_used(acct, 2.0) < 0.4:
        assert time.monotonic() < deadline, "the guest's loops did not start"
    t0 = throttled(cpu)
    limited = cores_used(acct, WINDOW)
    t1 = throttled(cpu)
    st2 = agent.ok("POST", f"/vms/{st['name']}/config", {"cpu_limit": 2})
    assert st2["limits_applied"]["cpu_limit"] == 2
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "200000"
    unlimited = cores_used(acct, WINDOW)
    t2 = throttled(cpu)
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"\ncpu_limit 0.5: {limited:.3f} cores over {WINDOW:g} s, throttled in "
          f"{t1 - t0} of {WINDOW * 10:g} periods; cpu_limit 2 (the host's cores): "
          f"{unlimited:.3f} cores, throttled in {t2 - t1}; load average {load}")
    assert limited <= 0.55, limited
    # the limit is what held it: throttled in most periods; once raised, hardly
    # throttled, or throttled only at the new ceiling (on a 2-core host the spinning
    # vCPUs plus qemu's own threads can reach 2 cores: CI saw 1.96 cores, 51 periods)
    # (the host is shared: how much more it gets then depends on the others' load)
    assert t1 - t0 >= WINDOW * 10 * 0.25, (t0, t1)
    assert t2 - t1 <= (t1 - t0) / 4 or unlimited >= 0.9 * 2, (t0, t1, t2, unlimited)
    assert unlimited > max(0.55, 1.2 * limited), (limited, unlimited)


def test_ram_limit_is_the_cgroups_limit_and_a_normal_boot_fits(session_agent):
    agent = session_agent
    name = "ramfit"
    st = agent.ok("POST", "/vms", {"name": name, "image": "test", "cpus": 2,
                                   "memory": "1G"}, timeout=600)
    try:
        spec = st["spec"]
        pid = st["pid"]
        assert spec["memory"] == 1 << 30 and spec["ram_limit"] > spec["memory"]
        status = agent.ok("GET", f"/vms/{name}")
        mem = cgroup_dir(status, "memory")
        assert int((mem / "memory.limit_in_bytes").read_text()) == spec["ram_limit"]
        assert int((mem / "memory.soft_limit_in_bytes").read_text()) == \
            spec["ram_guarantee"]
        agent.wait_ready(name, timeout=BOOT_TIMEOUT, cloud_init=True)
        status = agent.ok("GET", f"/vms/{name}")
        use = status["allocation"]["usage"]
        print(f"\nboot of a 1G guest: cgroup peak {use['memory_peak'] >> 20} MiB "
              f"(rss {use.get('memory_rss', 0) >> 20} MiB) under ram_limit "
              f"{spec['ram_limit'] >> 20} MiB; limit hits {use['memory_limit_hits']}, "
              f"OOM kills {use.get('oom_kills')}")
        assert status["state"] == "running" and status["pid"] == pid
        assert use["memory_peak"] <= spec["ram_limit"]
        assert use.get("oom_kills", 0) == 0
    finally:
        agent.call("DELETE", f"/vms/{name}")
    assert not mem.exists()
