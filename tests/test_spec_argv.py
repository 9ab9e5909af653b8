"""The VM spec (validation, defaults) and the qemu argv builder (pure)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from vmagent.qemu import argv as qargv
from vmagent.identity import seed
from vmagent.errors import BadRequest
from vmagent.spec import Defaults, VMSpec, apply_defaults, parse_size

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdM09Ct5ZbpGEQm6BvLA/Ji8N4McDg7RPn/6+OGhCmD t@x"


@pytest.mark.parametrize("name", ["../x", "a\x00b", "a" * 300, "Abc", "-x", "", "1abc", "a\n",
                                  "a_b", "a b", None, 5])
def test_bad_names_are_refused(name):
    with pytest.raises(BadRequest, match="name"):
        VMSpec.from_dict({"name": name})


@pytest.mark.parametrize("name", ["a", "dev1", "a-b-c", "a" * 63])
def test_good_names(name):
    assert VMSpec.from_dict({"name": name}).name == name


@pytest.mark.parametrize("text,expect", [("2G", 2 << 30), ("512M", 512 << 20),
                                         ("1T", 1 << 40), (1048576, 1 << 20),
                                         ("1.5G", 3 << 29)])
def test_sizes_parse(text, expect):
    assert parse_size(text) == expect


@pytest.mark.parametrize("text", ["2X", "", "G", "-1G", "abc", None, True, "1e9999G"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(BadRequest):
        parse_size(text)


@pytest.mark.parametrize("fields,match", [
    ({"memory": "2X"}, "memory"),
    ({"memory": "1K"}, "memory"),
    ({"disk": "12Q"}, "disk"),
    ({"cpus": 0}, "cpus"),
    ({"cpus": "two"}, "cpus"),
    ({"user_data": "a: [unclosed"}, "YAML|user_data"),
    ({"user_data": "- a list\n- not a mapping\n"}, "mapping"),
    ({"user_data": "a: '" + "x" * (64 << 10) + "'"}, "64 KiB"),
    ({"flavour": "big"}, "unknown field"),
    ({"ssh_keys": ["not a key"]}, "ssh_keys"),
    ({"admins": ["root"]}, "admins"),
    ({"admins": ["Bad User"]}, "admins"),
    ({"segment": "prod"}, "segment"),
    ({"cpu_guarantee": 3, "cpu_limit": 2, "segment": "default"}, "cpu_guarantee"),
    ({"ram_guarantee": "4G", "ram_limit": "2G"}, "ram_guarantee"),
    ({"cpu_guarantee": 3, "segment": "dev"}, "segment"),
])
def test_bad_spec_fields_give_clear_errors(fields, match):
    with pytest.raises(BadRequest, match=match):
        VMSpec.from_dict({"name": "vm", **fields})


def test_spec_must_be_an_object_with_a_name():
    with pytest.raises(BadRequest, match="object"):
        VMSpec.from_dict(["name"])
    with pytest.raises(BadRequest, match="name is required"):
        VMSpec.from_dict({"cpus": 2})


def test_allocation_fields_are_stored_and_returned():
    spec = VMSpec.from_dict({"name": "vm", "cpu_guarantee": 1.5, "cpu_limit": 4,
                             "ram_guarantee": "1G", "ram_limit": "4G", "segment": "dev"})
    d = spec.to_dict()
    assert (d["cpu_guarantee"], d["cpu_limit"]) == (1.5, 4)
    assert (d["ram_guarantee"], d["ram_limit"]) == (1 << 30, 4 << 30)
    assert VMSpec.from_dict(d) == spec                      # round trip


def test_defaults_fill_what_is_missing():
    full = apply_defaults(VMSpec.from_dict({"name": "vm", "ssh_keys": [KEY]}),
                          Defaults(), base_size=2 << 30)
    assert (full.image, full.cpus, full.memory, full.disk) == ("debian-12", 2, 2 << 30,
                                                               10 << 30)
    assert full.admins == ["dev"] and full.segment == "dev" and full.ssh_keys == [KEY]


def test_disk_is_never_smaller_than_the_image():
    assert apply_defaults(VMSpec(name="vm"), Defaults(), base_size=20 << 30).disk == 20 << 30
    with pytest.raises(BadRequest, match="smaller than the image"):
        apply_defaults(VMSpec.from_dict({"name": "vm", "disk": "1G"}), Defaults(),
                       base_size=2 << 30)


def _cfg(tmp_path: Path, **kw) -> qargv.MachineConfig:
    base = dict(name="vm1", run_dir=tmp_path, cpus=2, memory=1 << 30, accel="tcg",
                ssh_port=22022, mac="52:54:00:12:34:56",
                vmgenid="8b5e7f6a-1c2d-4e3f-9a0b-112233445566")
    base.update(kw)
    return qargv.MachineConfig(**base)


def _opt(argv: list[str], flag: str) -> list[str]:
    return [b for a, b in zip(argv, argv[1:]) if a == flag]


def test_argv_is_a_list_with_the_devices(tmp_path):
    argv = qargv.build_argv(_cfg(tmp_path))
    assert all(isinstance(a, str) for a in argv) and argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-accel") == ["tcg,thread=multi"] and _opt(argv, "-cpu") == ["max"]
    assert "-daemonize" in argv
    assert _opt(argv, "-pidfile") == [str(tmp_path.resolve() / "qemu.pid")]
    chardevs = " ".join(_opt(argv, "-chardev"))
    for sock in ("path=qmp.sock", "path=console.sock", "path=qga.sock"):
        assert sock in chardevs                              # relative: cwd is the run dir
    assert f"logfile={tmp_path.resolve() / 'console.log'}" in chardevs
    assert _opt(argv, "-vnc") == ["unix:vnc.sock"]
    devices = _opt(argv, "-device")
    assert "vmgenid,id=vmgenid0,guid=8b5e7f6a-1c2d-4e3f-9a0b-112233445566" in devices
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56" in devices
    assert any(d.startswith("virtio-blk-pci,drive=disk0") and "bootindex=1" in d
               for d in devices)
    assert "scsi-cd,bus=scsi0.0,drive=seed0,id=cd0" in devices
    assert _opt(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:22022-:22"]
    drives = _opt(argv, "-drive")
    assert any("node-name=hd0" in d for d in drives)
    assert any("media=cdrom" in d and "readonly=on" in d for d in drives)
    sandbox = _opt(argv, "-sandbox")[0]
    assert sandbox.startswith("on") and "spawn=deny" not in sandbox
    assert "elevateprivileges=deny" not in sandbox
    assert "-kernel" not in argv


def test_argv_kvm_kernel_boot_and_escaping(tmp_path):
    run = tmp_path / "a,b"
    argv = qargv.build_argv(_cfg(run, accel="kvm", kernel_boot=qargv.KernelBoot(
        "/k/vmlinuz", "/k/initrd", "root=/dev/vda console=ttyS0")))
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    assert _opt(argv, "-kernel") == ["/k/vmlinuz"] and _opt(argv, "-initrd") == ["/k/initrd"]
    assert _opt(argv, "-append") == ["root=/dev/vda console=ttyS0"]
    assert any("a,,b/disk.qcow2" in d for d in _opt(argv, "-drive"))
    with pytest.raises(ValueError):
        qargv.build_argv(_cfg(tmp_path, accel="hvf"))


def test_owns_cmdline(tmp_path):
    argv = qargv.build_argv(_cfg(tmp_path))
    assert qargv.owns_cmdline(argv, tmp_path)
    assert not qargv.owns_cmdline(argv, tmp_path / "other")
    assert not qargv.owns_cmdline(["/bin/sleep", *argv[1:]], tmp_path)
    assert not qargv.owns_cmdline([], tmp_path)


def test_installed_qemu_accepts_the_argv(tmp_path):
    """The argv is valid for the real qemu: start it paused, ask QMP, quit."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "disk.qcow2"),
                    "1G"], check=True)
    seed.write_seed_iso(tmp_path / "seed.iso", {"meta-data": b"instance-id: x\n"})
    argv = qargv.build_argv(_cfg(tmp_path, ssh_port=0)) + ["-S"]
    res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    pid = int((tmp_path / "qemu.pid").read_text())

    async def ask() -> dict:
        client = QMPClient("test")
        await client.connect(str(tmp_path / "qmp.sock"))
        try:
            return await client.execute("query-status")
        finally:
            await client.execute("quit")
            await client.disconnect()

    try:
        assert asyncio.run(ask())["status"] == "prelaunch"
    finally:
        subprocess.run(["kill", "-9", str(pid)], capture_output=True)
