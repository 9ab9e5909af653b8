"""vmagent.argv.build_argv (pure) and owns_cmdline, plus one check that the installed
qemu-system-x86_64 accepts the generated command line."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from vmagent.qemu import argv as qargv
from vmagent.identity import seed

GUID = "8b5e7f6a-1c2d-4e3f-9a0b-112233445566"
MAC = "52:54:00:12:34:56"


def cfg(run_dir: Path, **kw) -> qargv.MachineConfig:
    base = dict(name="vm1", run_dir=run_dir, cpus=2, memory=1 << 30, accel="tcg",
                ssh_port=22022, mac=MAC, vmgenid=GUID)
    base.update(kw)
    return qargv.MachineConfig(**base)


def opt(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [b for a, b in zip(argv, argv[1:]) if a == flag]


def one(argv: list[str], flag: str) -> str:
    values = opt(argv, flag)
    assert len(values) == 1, (flag, values)
    return values[0]


def props(value: str) -> dict[str, str]:
    """``a,b=c,d=e`` -> {"": "a", "b": "c", "d": "e"} (no ',,' escapes expected)."""
    out = {}
    for part in value.split(","):
        k, sep, v = part.partition("=")
        out[k if sep else ""] = v if sep else k
    return out


@pytest.fixture
def argv(tmp_path) -> list[str]:
    return qargv.build_argv(cfg(tmp_path))


def test_argv_is_a_list_of_strings(argv):
    assert isinstance(argv, list) and argv
    assert all(type(a) is str for a in argv)
    assert argv[0] == "qemu-system-x86_64"
    assert one(argv, "-name") == "vm1,debug-threads=on"
    assert one(argv, "-smp") == "2" and one(argv, "-m") == "1024M"
    assert one(argv, "-machine") == "q35"
    assert "-nodefaults" in argv and "-no-user-config" in argv


def test_qemu_binary_is_configurable(tmp_path):
    argv = qargv.build_argv(cfg(tmp_path, qemu_binary="/opt/qemu/bin/qemu-system-x86_64"))
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"


def test_tcg_flags(argv):
    assert one(argv, "-accel") == "tcg,thread=multi,tb-size=256"
    assert one(argv, "-cpu") == "qemu64"          # the model TCG emulates cheapest


def test_a_vm_keeps_its_device_model(tmp_path):
    # VMs and templates made before device models ran with -cpu max under TCG: their
    # saved states load only into that model, so they keep it
    legacy = qargv.build_argv(cfg(tmp_path, model=qargv.LEGACY_MODEL))
    assert one(legacy, "-cpu") == "max"
    assert one(qargv.build_argv(cfg(tmp_path, accel="kvm", model=qargv.LEGACY_MODEL)),
               "-cpu") == "host"
    assert qargv.model_of(legacy) == qargv.LEGACY_MODEL
    assert qargv.model_of(qargv.build_argv(cfg(tmp_path))) == qargv.DEVICE_MODEL
    assert qargv.model_of(qargv.build_argv(cfg(tmp_path, accel="kvm"))) == \
        qargv.DEVICE_MODEL
    assert qargv.model_of([]) == qargv.LEGACY_MODEL
    with pytest.raises(ValueError, match="device model"):
        qargv.build_argv(cfg(tmp_path, model=99))


def test_records_without_a_device_model_are_the_first_one():
    from vmagent.vms.store import Runtime
    assert Runtime.from_json({"state": "stopped"}).device_model == qargv.LEGACY_MODEL
    assert Runtime.from_json({"state": "stopped", "device_model": 2}).device_model == 2


def test_kvm_flags(tmp_path):
    argv = qargv.build_argv(cfg(tmp_path, accel="kvm"))
    assert one(argv, "-accel") == "kvm"
    assert one(argv, "-cpu") == "host"
    assert "tcg" not in " ".join(argv)


@pytest.mark.parametrize("accel", ["hvf", "KVM", "", "kvm,tcg", None])
def test_unknown_accel_is_a_value_error(tmp_path, accel):
    with pytest.raises(ValueError, match="accel"):
        qargv.build_argv(cfg(tmp_path, accel=accel))


def test_daemonize_with_an_absolute_pidfile_in_the_run_dir(tmp_path, monkeypatch):
    # a relative run dir is resolved too: the pidfile must not depend on qemu's cwd
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    argv = qargv.build_argv(cfg(Path("rel")))
    assert "-daemonize" in argv
    pidfile = one(argv, "-pidfile")
    assert os.path.isabs(pidfile)
    assert pidfile == str(tmp_path.resolve() / "rel" / qargv.PIDFILE)


def test_sockets_are_relative_to_the_run_dir(argv):
    chardevs = {props(c)["id"]: props(c) for c in opt(argv, "-chardev")}
    assert chardevs["qmp"]["path"] == "qmp.sock"
    assert chardevs["serial0"]["path"] == "console.sock"
    assert chardevs["qga0"]["path"] == "qga.sock"
    assert chardevs["qmpop"]["path"] == "qmp-operator.sock"     # the operator's monitor
    for c in chardevs.values():
        assert c[""] == "socket" and c["server"] == "on" and c["wait"] == "off"
        assert not os.path.isabs(c["path"]) and "/" not in c["path"]
    assert one(argv, "-vnc") == "unix:vnc.sock"
    assert opt(argv, "-mon") == ["chardev=qmp,mode=control", "chardev=qmpop,mode=control"]
    assert one(argv, "-serial") == "chardev:serial0"
    assert ("-device", "virtserialport,bus=vser0.0,chardev=qga0,"
            "name=org.qemu.guest_agent.0") in list(zip(argv, argv[1:]))


def test_console_logfile_is_absolute(tmp_path, argv):
    serial = next(props(c) for c in opt(argv, "-chardev") if "id=serial0" in c)
    assert serial["logfile"] == str(tmp_path.resolve() / qargv.CONSOLE_LOG)
    assert os.path.isabs(serial["logfile"]) and serial["logappend"] == "on"


def test_vmgenid_guid(argv):
    assert f"vmgenid,id=vmgenid0,guid={GUID}" in opt(argv, "-device")


def test_ssh_hostfwd_on_localhost_with_the_given_port(tmp_path):
    argv = qargv.build_argv(cfg(tmp_path, ssh_port=24567))
    assert one(argv, "-netdev") == "user,id=net0,hostfwd=tcp:127.0.0.1:24567-:22"


def test_virtio_net_with_the_mac(argv):
    nics = [d for d in opt(argv, "-device") if d.startswith("virtio-net-pci")]
    assert nics == [f"virtio-net-pci,netdev=net0,mac={MAC}"]


def test_disk_drive_and_device(tmp_path, argv):
    drives = {props(d)["id"]: props(d) for d in opt(argv, "-drive")}
    disk = drives["disk0"]
    assert disk["file"] == str(tmp_path.resolve() / qargv.DISK)
    assert disk["node-name"] == qargv.DISK_NODE == "hd0"
    assert disk["format"] == "qcow2" and disk["if"] == "none"
    blk = [props(d) for d in opt(argv, "-device") if d.startswith("virtio-blk-pci")]
    assert blk == [{"": "virtio-blk-pci", "drive": "disk0", "id": "vda", "bootindex": "1"}]
    # the disk is the only boot device
    assert sum("bootindex" in d for d in opt(argv, "-device")) == 1


def test_seed_is_a_read_only_scsi_cd(tmp_path, argv):
    drives = {props(d)["id"]: props(d) for d in opt(argv, "-drive")}
    seed_drive = drives["seed0"]
    assert seed_drive["file"] == str(tmp_path.resolve() / qargv.SEED)
    assert seed_drive["media"] == "cdrom" and seed_drive["readonly"] == "on"
    assert seed_drive["format"] == "raw" and seed_drive["if"] == "none"
    cds = [props(d) for d in opt(argv, "-device") if d.startswith("scsi-cd")]
    assert cds == [{"": "scsi-cd", "bus": "scsi0.0", "drive": "seed0", "id": "cd0"}]
    assert qargv.SEED_DEVICE == "cd0"
    assert "virtio-scsi-pci,id=scsi0" in opt(argv, "-device")


def test_explicit_disk_and_seed_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = qargv.build_argv(cfg(tmp_path / "run", disk=Path("d.qcow2"), seed=Path("s.iso")))
    files = {props(d)["id"]: props(d)["file"] for d in opt(argv, "-drive")}
    assert files == {"disk0": str(tmp_path.resolve() / "d.qcow2"),
                     "seed0": str(tmp_path.resolve() / "s.iso")}


def test_no_kernel_options_without_kernel_boot(argv):
    for flag in ("-kernel", "-initrd", "-append"):
        assert flag not in argv


def test_kernel_boot(tmp_path):
    argv = qargv.build_argv(cfg(tmp_path, kernel_boot=qargv.KernelBoot(
        "/img/vmlinuz", "/img/initrd.img", "root=LABEL=rootfs console=ttyS0 rw no_timer_check")))
    assert one(argv, "-kernel") == "/img/vmlinuz"
    assert one(argv, "-initrd") == "/img/initrd.img"
    assert one(argv, "-append") == "root=LABEL=rootfs console=ttyS0 rw no_timer_check"   # one argument


def test_kernel_boot_without_initrd_or_append(tmp_path):
    argv = qargv.build_argv(cfg(tmp_path, kernel_boot=qargv.KernelBoot("/img/vmlinuz")))
    assert one(argv, "-kernel") == "/img/vmlinuz"
    assert "-initrd" not in argv and "-append" not in argv


def test_sandbox_keeps_what_daemonize_needs(argv):
    sandbox = one(argv, "-sandbox")
    assert sandbox.split(",")[0] == "on"
    assert "obsolete=deny" in sandbox
    assert "spawn=deny" not in sandbox and "elevateprivileges=deny" not in sandbox


def test_sandbox_can_be_turned_off(tmp_path):
    assert "-sandbox" not in qargv.build_argv(cfg(tmp_path, sandbox=False))


def test_comma_in_a_path_is_escaped_in_drive(tmp_path):
    run = tmp_path / "a,b"
    argv = qargv.build_argv(cfg(run))
    drives = opt(argv, "-drive")
    escaped = str(run.resolve()).replace(",", ",,")
    assert f"file={escaped}/disk.qcow2," in drives[0]
    assert f"file={escaped}/seed.iso," in drives[1]
    # undoing the escape gives back the real path; no unescaped comma inside the value
    value = drives[0].split("file=", 1)[1].split(",if=none", 1)[0]
    assert value.replace(",,", ",") == str(run.resolve() / "disk.qcow2")


def test_owns_cmdline(tmp_path, argv):
    assert qargv.owns_cmdline(argv, tmp_path)
    assert qargv.owns_cmdline(["/usr/bin/qemu-system-x86_64", *argv[1:]], tmp_path)
    assert not qargv.owns_cmdline(argv, tmp_path / "other")
    other = qargv.build_argv(cfg(tmp_path / "vm2"))
    assert not qargv.owns_cmdline(other, tmp_path)
    assert not qargv.owns_cmdline(["/bin/sleep", *argv[1:]], tmp_path)
    assert not qargv.owns_cmdline(["python3", "-c", "x", *argv[1:]], tmp_path)
    assert not qargv.owns_cmdline([], tmp_path)
    # "-pidfile" must be the option, not the tail of another argument
    assert not qargv.owns_cmdline(["qemu-system-x86_64", "-name",
                                   str(tmp_path.resolve() / qargv.PIDFILE)], tmp_path)


# --- the installed qemu accepts it ------------------------------------------------------

IMAGE_DIR = Path(os.environ.get("VMCTL_TEST_IMAGE_DIR", "/var/cache/vm-test-image"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_installed_qemu_accepts_the_argv(tmp_path):
    """Run the generated command line in the foreground (no -daemonize) and paused (-S),
    ask QMP for the status and the block devices, quit. Proves every option and device
    is valid for the installed qemu (with the test image's kernel, if present, also
    -kernel/-initrd/-append: qemu loads them before it pauses)."""
    run = tmp_path / "run"
    run.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(run / qargv.DISK), "1G"],
                   check=True)
    seed.write_seed_iso(run / qargv.SEED, {})
    kernel = None
    if (IMAGE_DIR / "vmlinuz").is_file() and (IMAGE_DIR / "initrd.img").is_file():
        kernel = qargv.KernelBoot(str(IMAGE_DIR / "vmlinuz"), str(IMAGE_DIR / "initrd.img"),
                                  "root=LABEL=rootfs console=ttyS0 rw no_timer_check")
    argv = qargv.build_argv(cfg(run, ssh_port=free_port(), kernel_boot=kernel))
    argv = [a for a in argv if a != "-daemonize"] + ["-S"]
    proc = subprocess.Popen(argv, cwd=run, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (run / qargv.QMP_SOCK).exists():
            if proc.poll() is not None:
                pytest.fail(f"qemu refused the argv (exit {proc.returncode}): "
                            f"{proc.stdout.read().decode(errors='replace')}\n{argv}")
            assert time.monotonic() < deadline, "qemu did not create its QMP socket"
            time.sleep(0.05)
        assert int((run / qargv.PIDFILE).read_text()) == proc.pid

        async def ask() -> tuple[dict, list]:
            client = QMPClient("test-argv")
            await client.connect(str(run / qargv.QMP_SOCK))
            status = await client.execute("query-status")
            blocks = await client.execute("query-block")
            try:
                await client.execute("quit")
            except Exception:  # noqa: BLE001 - qemu may close before it answers
                pass
            try:
                await client.disconnect()
            except (EOFError, ConnectionError):
                pass                          # qemu closed the socket: that is quit
            return status, blocks

        status, blocks = asyncio.run(asyncio.wait_for(ask(), 20))
        assert status["status"] == "prelaunch" and status["running"] is False
        inserted = {b["inserted"]["node-name"]: b for b in blocks if b.get("inserted")}
        assert inserted["hd0"]["inserted"]["file"] == str(run.resolve() / qargv.DISK)
        cd = next(b for b in blocks if b.get("qdev", "").startswith("cd0"))
        assert cd["removable"] and cd["inserted"]["ro"]
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
