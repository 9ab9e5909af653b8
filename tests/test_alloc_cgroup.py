"""The cgroup backends on trees in a temporary directory (v1 and v2 alike), the launch
wrapper with a real shell, and the detection of what a host has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alloc_helpers import v1_tree, v2_tree
from vmagent.alloc.cgroup import Limits, NoCgroups
from vmagent.alloc.cgroupfs import V1, V2, open_cgroups
from vmagent.errors import InternalError

G = 1 << 30
LIMITS = Limits(cpu_guarantee=1.5, cpu_limit=0.5, ram_guarantee=G, ram_limit=2 * G)
NO_CEILING = Limits(cpu_guarantee=None, cpu_limit=None, ram_guarantee=G, ram_limit=G)


def test_v1_files_of_a_vm(tmp_path):
    cg = open_cgroups("auto", v1_tree(tmp_path), "vmagent")
    assert isinstance(cg, V1) and cg.kind == "v1"
    cg.create("vm1", LIMITS)
    cpu, mem = tmp_path / "cpu/vmagent/vm1", tmp_path / "memory/vmagent/vm1"
    assert (cpu / "cpu.shares").read_text() == "1536"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
    assert (mem / "memory.soft_limit_in_bytes").read_text() == str(G)
    assert (mem / "memory.limit_in_bytes").read_text() == str(2 * G)
    assert (tmp_path / "cpuacct/vmagent/vm1").is_dir()
    assert cg.values("vm1")["cpu.cfs_quota_us"] == "50000"
    assert cg.path("vm1") == "/vmagent/vm1" and cg.names() == ["vm1"]
    cg.apply("vm1", NO_CEILING)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "-1"
    assert (cpu / "cpu.shares").read_text() == "2"        # no guarantee: the least weight


def test_v2_files_of_a_vm_and_the_delegation(tmp_path):
    cg = open_cgroups("auto", v2_tree(tmp_path), "machine.slice/vmagent")
    assert isinstance(cg, V2)
    cg.create("vm1", LIMITS)
    d = tmp_path / "machine.slice/vmagent/vm1"
    assert (d / "cpu.weight").read_text() == "150"
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert (d / "memory.min").read_text() == str(G)
    assert (d / "memory.max").read_text() == str(2 * G)
    for node in (tmp_path, tmp_path / "machine.slice", tmp_path / "machine.slice/vmagent"):
        enabled = (node / "cgroup.subtree_control").read_text().split()
        assert "cpu" in enabled and "memory" in enabled, node
    cg.apply("vm1", NO_CEILING)
    assert (d / "cpu.max").read_text() == "max 100000"
    assert (d / "cpu.weight").read_text() == "1"


def test_the_parent_weighs_the_allocatable_cores(tmp_path):
    cg = open_cgroups("auto", v1_tree(tmp_path), "vmagent")
    cg.parent_cores = 1.5
    cg.create("vm1", LIMITS)
    assert (tmp_path / "cpu/vmagent/cpu.shares").read_text() == "1536"
    cg2 = open_cgroups("auto", v2_tree(tmp_path / "v2"), "vmagent")
    cg2.parent_cores = 3.5
    cg2.create("vm1", LIMITS)
    assert (tmp_path / "v2/vmagent/cpu.weight").read_text() == "350"


def test_weights_are_bounded():
    assert Limits(100.0, None, 0, 0).v2()["cpu.weight"] == "10000"
    assert Limits(0.001, None, 0, 0).v1()["cpu"]["cpu.shares"] == "2"
    assert Limits(None, 0.001, 0, 0).v1()["cpu"]["cpu.cfs_quota_us"] == "1000"


@pytest.mark.parametrize("tree", [v1_tree, v2_tree])
def test_the_wrapper_runs_the_command_inside_the_cgroup(tmp_path, tree):
    """The wrapper writes its own pid into every cgroup.procs, then execs the command
    (same pid): what it runs is in the cgroup before its first instruction."""
    cg = open_cgroups("auto", tree(tmp_path / "cg"), "vmagent")
    cg.create("vm1", LIMITS)
    out = tmp_path / "pid"
    prog = f"import os; open({str(out)!r}, 'w').write(str(os.getpid()))"
    proc = subprocess.run([*cg.wrap("vm1"), sys.executable, "-c", prog],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    pid = int(out.read_text())
    assert cg.contains("vm1", pid)
    for d in cg.dirs("vm1"):
        assert (d / "cgroup.procs").read_text().split() == [str(pid)]


def test_the_wrapper_fails_clearly_when_the_cgroup_is_gone(tmp_path):
    cg = open_cgroups("auto", v1_tree(tmp_path / "cg"), "vmagent")
    proc = subprocess.run([*cg.wrap("vm1"), "true"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 125
    assert "cannot put qemu into its cgroup" in proc.stderr


def test_attach_and_remove(tmp_path):
    cg = open_cgroups("auto", v1_tree(tmp_path), "vmagent")
    cg.create("vm1", LIMITS)
    assert not cg.contains("vm1", os.getpid())
    cg.attach("vm1", os.getpid())
    assert cg.contains("vm1", os.getpid())
    assert (tmp_path / "memory/vmagent/vm1/memory.move_charge_at_immigrate").exists() \
        is False            # only where the kernel has it
    assert cg.remove("vm1") is False            # a process is in it: busy
    for d in cg.dirs("vm1"):
        (d / "cgroup.procs").write_text("")
    assert cg.remove("vm1") is True
    assert not (tmp_path / "cpu/vmagent").exists()      # the parent went with it
    assert cg.remove("vm1") is True                     # already gone


def test_the_parent_stays_while_another_vm_has_a_cgroup(tmp_path):
    cg = open_cgroups("auto", v2_tree(tmp_path), "vmagent")
    cg.create("a", LIMITS)
    cg.create("b", LIMITS)
    assert cg.remove("a") and (tmp_path / "vmagent/b").is_dir()


def test_usage_is_read_from_the_accounting_files(tmp_path):
    cg = open_cgroups("auto", v1_tree(tmp_path), "vmagent")
    cg.create("vm1", LIMITS)
    (tmp_path / "cpuacct/vmagent/vm1/cpuacct.usage").write_text("2500000000\n")
    (tmp_path / "memory/vmagent/vm1/memory.usage_in_bytes").write_text("1048576\n")
    (tmp_path / "memory/vmagent/vm1/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    use = cg.usage("vm1")
    assert use["cpu_seconds"] == 2.5 and use["memory"] == 1 << 20 and use["oom_kills"] == 0
    cg2 = open_cgroups("auto", v2_tree(tmp_path / "v2"), "vmagent")
    cg2.create("vm1", LIMITS)
    (tmp_path / "v2/vmagent/vm1/cpu.stat").write_text("usage_usec 1500000\nuser_usec 1\n")
    assert cg2.usage("vm1")["cpu_seconds"] == 1.5


def test_detection(tmp_path):
    assert isinstance(open_cgroups("auto", tmp_path / "nothing", "x"), NoCgroups)
    none = open_cgroups("auto", tmp_path / "nothing", "x")
    assert "no usable cgroup hierarchy" in none.describe()["reason"]
    with pytest.raises(InternalError, match="cgroup.mode v1"):
        open_cgroups("v1", tmp_path / "nothing", "x")
    with pytest.raises(InternalError, match="no cpu"):
        open_cgroups("v2", v2_tree(tmp_path / "v2", "memory pids"), "x")
    # a v2 root without the controllers (like /sys/fs/cgroup/unified here) is passed
    # over for v1
    both = v1_tree(tmp_path / "both")
    (both / "cgroup.controllers").write_text("\n")
    assert open_cgroups("auto", both, "x").kind == "v1"
    assert open_cgroups("none", both, "x").kind == "none"


def test_this_machine_is_detected_as_v1():
    """These machines have cgroup v1 controllers mounted, and the v2 mount has none:
    the v1 backend is what enforces here (the integration tests measure it)."""
    if os.geteuid() != 0 or V1.usable(Path("/sys/fs/cgroup")) is not None:
        pytest.skip("needs root on a host with cgroup v1 controllers mounted")
    cg = open_cgroups("auto", Path("/sys/fs/cgroup"), "vmagent-test-detect")
    assert cg.kind == "v1" and cg.real
