"""Sizing (the allocation fields completed and checked) and the agent's config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmagent.alloc import config as cfgmod
from vmagent.alloc.sizing import Demand, Rules, demand, resize, size
from vmagent.errors import BadRequest
from vmagent.spec import VMSpec

M, G = 1 << 20, 1 << 30
RULES = Rules(overhead=256 * M, cpu_guarantee=0.0, cpus=2, memory=2 * G, segment="dev")


def sized(**fields) -> VMSpec:
    return size(VMSpec.from_dict({"name": "vm", **fields}), RULES)


def refused(match: str, **fields) -> str:
    with pytest.raises(BadRequest) as exc:
        sized(**fields)
    assert match in exc.value.message, exc.value.message
    return exc.value.message


# --- RAM --------------------------------------------------------------------------------

def test_nothing_given_reserves_the_default_vm_whole():
    s = sized()
    assert (s.segment, s.cpus, s.memory) == ("dev", 2, 2 * G)
    assert s.ram_limit == 2 * G + 256 * M and s.ram_guarantee == s.ram_limit
    assert s.cpu_guarantee is None and s.cpu_limit is None and s.gpus == 0
    assert demand(s) == Demand(0.0, 2 * G + 256 * M, 0)


def test_memory_defaults_from_the_limit_then_the_guarantee():
    assert sized(ram_limit="4G").memory == 4 * G - 256 * M
    assert sized(ram_guarantee="1G").memory == 1 * G
    s = sized(ram_guarantee="1G")
    assert s.ram_limit == G + 256 * M and s.ram_guarantee == G


def test_memory_that_does_not_fit_under_the_limit_is_refused_with_the_numbers():
    msg = refused("does not fit under ram_limit", memory="4G", ram_limit="4G")
    assert "256M" in msg and "at least 4352M" in msg and "leave out memory" in msg
    s = sized(memory="1G", ram_limit="2G")          # headroom is fine
    assert (s.memory, s.ram_limit, s.ram_guarantee) == (G, 2 * G, 2 * G)


def test_a_limit_too_small_for_any_guest_is_refused():
    msg = refused("leaves", ram_limit="300M")
    assert "at least 384M" in msg


def test_guarantee_above_limit_is_refused():
    refused("above ram_limit", ram_guarantee="3G", ram_limit="2G")
    refused("above ram_limit", ram_guarantee="3G", memory="1G")


# --- CPU and segments -------------------------------------------------------------------

def test_dev_has_no_cpu_limit_and_refuses_one():
    msg = refused("no CPU limit", cpu_limit=1)
    assert "'default'" in msg
    refused("no CPU limit", cpu_limit=1, segment="gpu-dev")
    assert sized(cpu_guarantee=1.5).cpu_limit is None


def test_dev_refuses_a_guarantee_above_two_naming_the_rule():
    msg = refused("at most 2 cores", cpu_guarantee=4)
    assert "segment 'dev'" in msg


def test_default_segment_limit_defaults_to_the_vcpus():
    s = sized(segment="default", cpus=3)
    assert s.cpu_limit == 3.0 and s.cpu_guarantee is None
    s = sized(segment="default", cpus=3, cpu_limit=0.5, cpu_guarantee=0.25)
    assert (s.cpu_limit, s.cpu_guarantee) == (0.5, 0.25)
    refused("above cpu_limit", segment="default", cpu_guarantee=4, cpu_limit=1)


def test_the_hosts_default_guarantee_is_capped_by_the_limit():
    rules = Rules(overhead=256 * M, cpu_guarantee=1.0)
    s = size(VMSpec.from_dict({"name": "v", "segment": "default", "cpu_limit": 0.5}), rules)
    assert s.cpu_guarantee == 0.5
    assert size(VMSpec.from_dict({"name": "v"}), rules).cpu_guarantee == 1.0


def test_gpus_belong_to_gpu_dev():
    assert sized(segment="gpu-dev").gpus == 1
    assert sized(segment="gpu-dev", gpus=2).gpus == 2
    refused("at least 1", segment="gpu-dev", gpus=0)
    refused("only segment gpu-dev", gpus=1)
    refused("only segment gpu-dev", gpus=1, segment="default")
    with pytest.raises(BadRequest, match="gpus"):
        VMSpec.from_dict({"name": "v", "gpus": 9})


# --- push_config ------------------------------------------------------------------------

def test_derived_fields_follow_what_they_derive_from():
    old = sized()
    new = resize(old, {"memory": "4G"}, RULES)
    assert new.memory == 4 * G and new.ram_limit == 4 * G + 256 * M
    assert new.ram_guarantee == new.ram_limit
    new = resize(old, {"ram_limit": "1G"}, RULES)
    assert new.memory == G - 256 * M and new.ram_guarantee == G


def test_fields_that_were_set_stay():
    old = sized(memory="2G", ram_limit="3G", ram_guarantee="1G")
    new = resize(old, {"memory": "2560M"}, RULES)
    assert (new.ram_limit, new.ram_guarantee) == (3 * G, G)
    with pytest.raises(BadRequest, match="does not fit under ram_limit"):
        resize(old, {"memory": "3G"}, RULES)
    old = sized(segment="default", cpus=2, cpu_limit=1)
    assert resize(old, {"cpus": 4}, RULES).cpu_limit == 1
    old = sized(segment="default", cpus=2)
    assert resize(old, {"cpus": 4}, RULES).cpu_limit == 4


def test_the_segment_of_a_vm_cannot_change():
    with pytest.raises(BadRequest, match="cannot change"):
        resize(sized(), {"segment": "default"}, RULES)
    assert resize(sized(), {"segment": "dev"}, RULES).segment == "dev"


def test_a_spec_from_before_sizing_is_sized_by_resize():
    old = VMSpec(name="vm", image="x", cpus=2, memory=G, disk=4 * G, segment="dev")
    new = resize(old, {"cpu_guarantee": 1}, RULES)
    assert new.ram_limit == G + 256 * M and new.cpu_guarantee == 1


def test_rules_round_trip_through_json():
    assert Rules.from_json(RULES.to_json()) == RULES
    assert Rules.from_json(None) == Rules()
    assert Rules.from_json({"overhead": 1, "unknown": 2}).overhead == 1


# --- the agent's config file ------------------------------------------------------------

def parse(text: str, tmp_path: Path) -> cfgmod.AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return cfgmod.load(path)


def test_a_full_config(tmp_path):
    cfg = parse('''
name = "host-a"
segments = ["default", "gpu-dev"]
[capacity]
cpus = 8
memory = "16G"
reserve_cpus = 1
reserve_memory = "2G"
qemu_overhead = "300M"
[defaults]
image = "test"
cpus = 1
memory = "1G"
segment = "default"
cpu_guarantee = 0.5
[cgroup]
mode = "v2"
root = "/tmp/cg"
parent = "machine.slice/vmagent"
[[gpu]]
address = "65:00.0"
label = "A40"
''', tmp_path)
    assert cfg.name == "host-a" and cfg.served == ("default", "gpu-dev")
    assert (cfg.capacity.cpus, cfg.capacity.memory) == (8, 16 * G)
    assert (cfg.capacity.reserve_cpus, cfg.capacity.reserve_memory) == (1, 2 * G)
    assert cfg.capacity.qemu_overhead == 300 * M
    assert (cfg.defaults.image, cfg.defaults.cpus, cfg.defaults.memory,
            cfg.defaults.segment) == ("test", 1, G, "default")
    assert cfg.cpu_guarantee == 0.5
    assert (cfg.cgroup.mode, str(cfg.cgroup.root), cfg.cgroup.parent) == (
        "v2", "/tmp/cg", "machine.slice/vmagent")
    assert [(g.address, g.label) for g in cfg.gpus] == [("0000:65:00.0", "A40")]


def test_an_empty_config_is_the_defaults(tmp_path):
    cfg = parse("", tmp_path)
    assert cfg.served == ("dev", "default")
    assert cfg.capacity.cpus is None and cfg.capacity.reserve_cpus == 0.5
    assert cfg.cgroup.mode == "auto" and cfg.cgroup.parent is None
    gpu = parse('[[gpu]]\naddress = "0000:01:00.0"\n', tmp_path)
    assert gpu.served == ("dev", "default", "gpu-dev")


@pytest.mark.parametrize("text,match", [
    ("colour = 1", "unknown key(s) colour"),
    ("[capacity]\ncores = 3", "capacity.cores"),
    ("[capacity]\ncpus = -1", "capacity.cpus: expected a number >= 0.01"),
    ("[capacity]\nmemory = \"lots\"", "capacity.memory"),
    ("segments = [\"prod\"]", "segments"),
    ("segments = []", "segments"),
    ("name = \"a b\"", "name"),
    ("[cgroup]\nmode = \"v3\"", "cgroup.mode"),
    ("[cgroup]\nparent = \"../x\"", "cgroup.parent"),
    ("[[gpu]]\naddress = \"gpu0\"", "not a PCI address"),
    ("[[gpu]]\naddress = \"01:00.0\"\n[[gpu]]\naddress = \"0000:01:00.0\"", "twice"),
    ("[defaults]\ncpus = 1.5", "defaults.cpus"),
    ("[defaults]\nimage = \"../x\"", "defaults.image"),
    ("name = ", "agent.toml"),
])
def test_bad_configs_name_the_file_and_the_key(tmp_path, text, match):
    with pytest.raises(cfgmod.ConfigError) as exc:
        parse(text, tmp_path)
    assert match in str(exc.value) and str(tmp_path / "agent.toml") in str(exc.value)


def test_a_missing_config_file_is_an_error_but_no_file_at_all_is_the_defaults(
        tmp_path, monkeypatch):
    with pytest.raises(cfgmod.ConfigError, match="cannot read"):
        cfgmod.load(tmp_path / "nope.toml")
    monkeypatch.delenv("VMAGENT_CONFIG", raising=False)
    monkeypatch.setattr(cfgmod, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert cfgmod.load(None).path is None
    (tmp_path / "env.toml").write_text('name = "from-env"\n')
    monkeypatch.setenv("VMAGENT_CONFIG", str(tmp_path / "env.toml"))
    assert cfgmod.load(None).name == "from-env"


def test_qemus_overhead_counts_tcgs_code_buffer_as_capped_in_the_argv():
    from vmagent.alloc.sizing import (QEMU_BASE_OVERHEAD, TCG_CODE_BUFFER, overhead_for)
    from vmagent.qemu.argv import TCG_TB_MIB
    assert TCG_CODE_BUFFER == TCG_TB_MIB * M
    assert overhead_for("kvm") == QEMU_BASE_OVERHEAD
    assert overhead_for("tcg") == QEMU_BASE_OVERHEAD + TCG_CODE_BUFFER


def test_the_hosts_rules_follow_its_accelerator_unless_its_config_says(tmp_path):
    from vmagent.alloc.config import AgentConfig, Capacity, CgroupConfig
    from vmagent.alloc.service import Allocator
    from vmagent.alloc.sizing import overhead_for
    from vmagent.spec import Defaults
    accel = ["tcg"]
    cfg = AgentConfig(cgroup=CgroupConfig(mode="none"))
    alloc = Allocator(cfg, tmp_path, Defaults(), lambda: iter(()), accel=lambda: accel[0])
    assert alloc.rules.overhead == overhead_for("tcg")
    accel[0] = "kvm"
    assert alloc.rules.overhead == overhead_for("kvm")
    cfg = AgentConfig(capacity=Capacity(qemu_overhead=100 * M),
                      cgroup=CgroupConfig(mode="none"))
    assert Allocator(cfg, tmp_path, Defaults(), lambda: iter(())).rules.overhead == 100 * M
