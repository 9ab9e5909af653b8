"""SSH connection sharing (vmctl/sshmaster.py): the naming and option logic, and real
OpenSSH masters against a private sshd on localhost (no VM needed): one login, then
channels; a dead, foreign or stale socket is never used; close stops the master."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from sshd_helpers import keygen, start_sshd
from vmctl import sshmaster, vmssh
from vmctl.address import Address, Target, parse_address

STATUS = {"name": "dev1", "state": "running", "ssh_host": "127.0.0.1", "ssh_port": 20022,
          "ssh_user": "root", "created": "2026-11-25T06:00:00Z",
          "instance_id": "dev1-0123456789ab", "boot_id": "b00700000000aaaa"}
LOCAL = Target(Address("unix", path="/var/lib/vmagent/vmagent.sock"), label="local")


def _opts(argv):
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-o")


@pytest.fixture
def runtime(monkeypatch, tmp_path):
    """A private, short $XDG_RUNTIME_DIR (unix socket paths are short) and HOME."""
    d = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    yield d
    for sock in (d / "vmctl" / "ssh").glob("*"):
        if stat.S_ISSOCK(os.lstat(sock).st_mode):
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                           capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


# --- names and options (pure logic) ---------------------------------------------------

def test_the_name_changes_with_whatever_makes_another_vm_or_boot():
    base = sshmaster.socket_name(LOCAL, STATUS, "vmctl.local.dev1.1", "k1")
    assert base == sshmaster.socket_name(LOCAL, dict(STATUS), "vmctl.local.dev1.1", "k1")
    prefix = sshmaster.vm_prefix(LOCAL, "dev1")
    assert base.startswith(prefix + "-") and len(base) == 21
    others = [sshmaster.socket_name(LOCAL, {**STATUS, **change}, "vmctl.local.dev1.1", "k1")
              for change in ({"boot_id": "another"}, {"instance_id": "dev1-fff"},
                             {"ssh_port": 20023}, {"created": "2026-11-26T00:00:00Z"})]
    others.append(sshmaster.socket_name(LOCAL, STATUS, "vmctl.local.dev1.2", "k1"))
    others.append(sshmaster.socket_name(LOCAL, STATUS, "vmctl.local.dev1.1", "k2"))
    assert len({base, *others}) == 7
    # the same VM through another agent: another prefix
    lab = Target(parse_address("http://10.0.0.5:8765"), label="lab")
    assert not sshmaster.socket_name(lab, STATUS, "a", "k").startswith(prefix)
    # every boot-related change keeps the VM's prefix (close finds them all)
    assert all(o.startswith(prefix + "-") for o in others)


def test_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert sshmaster.runtime_dir() == tmp_path / "vmctl"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert sshmaster.runtime_dir() == Path(f"/tmp/vmctl-{os.getuid()}")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert sshmaster.runtime_dir() == Path(f"/tmp/vmctl-{os.getuid()}")


def test_the_directory_is_made_private_and_refused_when_it_is_not(runtime):
    d = sshmaster.control_dir()
    assert d == runtime / "vmctl" / "ssh"
    for p in (d, d.parent):
        st = os.lstat(p)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    os.chmod(d, 0o755)                           # others may enter: not used
    assert sshmaster.control_dir() is None
    assert sshmaster.options(None) == {"ControlMaster": "no", "ControlPath": "none"}
    os.chmod(d, 0o700)
    os.chown(d.parent, 65534, 65534)             # someone else's: not used
    assert sshmaster.control_dir() is None
    os.chown(d.parent, os.getuid(), os.getgid())
    shutil.rmtree(d)
    os.symlink("/tmp", d)                        # a link: not used
    assert sshmaster.control_dir() is None


def test_no_sharing_when_the_directory_is_unsafe(runtime, monkeypatch):
    (runtime / "vmctl").mkdir(mode=0o755)
    os.chmod(runtime / "vmctl", 0o755)
    opts = _opts(vmssh.ssh_argv(LOCAL, STATUS, None, ["true"]))
    assert opts["ControlPath"] == "none" and opts["ControlMaster"] == "no"
    assert "ControlPersist" not in opts


def test_options_share_through_this_boots_socket(runtime):
    opts = _opts(vmssh.ssh_argv(LOCAL, STATUS, None, ["true"], batch=True))
    path = vmssh.control_socket(LOCAL, STATUS)
    assert path.parent == runtime / "vmctl" / "ssh"
    assert (opts["ControlMaster"], opts["ControlPath"], opts["ControlPersist"]) == \
        ("auto", str(path), "60s")
    block = vmssh.config_block(LOCAL, STATUS, None)
    assert f"    ControlPath {path}" in block.splitlines()
    assert "    ControlMaster auto" in block and "    ControlPersist 60s" in block
    # a rebooted VM: another socket
    assert vmssh.control_socket(LOCAL, {**STATUS, "boot_id": "x"}) != path


def test_percent_signs_are_escaped_for_ssh():
    assert sshmaster.escape("/run/a%b/c") == "/run/a%%b/c"


def test_anything_but_a_live_master_is_removed(runtime):
    d = sshmaster.control_dir()
    junk = d / "aaaa-file"
    junk.write_text("not a socket")
    sshmaster.prepare(junk)
    assert not junk.exists()
    dead = d / "aaaa-dead"                      # a socket nobody listens on
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    assert not sshmaster.check(dead)
    sshmaster.prepare(dead)
    assert not os.path.lexists(dead)
    foreign = d / "aaaa-foreign"                # a socket of another user
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(foreign))
    s.listen(1)
    os.chown(foreign, 65534, 65534)
    try:
        assert not sshmaster.check(foreign)      # never asked: not ours
        sshmaster.prepare(foreign)
        assert not os.path.lexists(foreign)
    finally:
        s.close()


# --- real masters against a private sshd ----------------------------------------------

@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    pub = keygen(d / "client_key")
    proc, port, host_pub, sshd_dir = start_sshd({"root": pub})
    yield {"port": port, "key": d / "client_key", "host_pub": host_pub,
           "log": sshd_dir / "sshd.log"}
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(sshd_dir, ignore_errors=True)


def _logins(sshd) -> int:
    return sshd["log"].read_text(errors="replace").count("Accepted publickey")


def _ssh(sshd, status, *command: str) -> subprocess.CompletedProcess:
    argv = vmssh.ssh_argv(LOCAL, status, None, list(command), batch=True,
                          identities=(sshd["key"],))
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=30)


@pytest.fixture
def vm(sshd, runtime):
    """A "VM" whose SSH port is the private sshd, with its host key pinned."""
    status = {**STATUS, "ssh_port": sshd["port"],
              "ssh_host_keys": [sshd["host_pub"]], "boot_id": os.urandom(4).hex()}
    assert vmssh.pin_host_keys(lambda *a, **k: {}, LOCAL, status)
    return status


def test_one_login_then_channels(sshd, vm):
    before = _logins(sshd)
    ok, why = vmssh.try_login(LOCAL, vm, None, identities=(sshd["key"],))
    assert ok, why
    path = vmssh.control_socket(LOCAL, vm)
    assert sshmaster.check(path)
    pid = sshmaster.master_pid(path)
    assert pid and pid != os.getpid()
    # two more commands: the same sshd connection process serves both (one login)
    first, second = (_ssh(sshd, vm, "echo $PPID") for _ in range(2))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and first.stdout.strip().isdigit()
    assert _logins(sshd) == before + 1
    assert sshmaster.master_pid(path) == pid


def test_a_killed_master_is_replaced_by_a_new_login(sshd, vm):
    assert _ssh(sshd, vm, "true").returncode == 0
    path = vmssh.control_socket(LOCAL, vm)
    pid = sshmaster.master_pid(path)
    os.kill(pid, 9)
    logins = _logins(sshd)
    result = _ssh(sshd, vm, "echo", "still")    # the socket is left behind, dead
    assert result.returncode == 0 and result.stdout == "still\n", result.stderr
    assert _logins(sshd) == logins + 1
    assert sshmaster.master_pid(path) not in (None, pid)


def test_close_stops_every_master_of_the_vm(sshd, vm):
    other_boot = {**vm, "boot_id": "other"}
    assert _ssh(sshd, vm, "true").returncode == 0
    assert _ssh(sshd, other_boot, "true").returncode == 0
    paths = [vmssh.control_socket(LOCAL, s) for s in (vm, other_boot)]
    assert all(sshmaster.check(p) for p in paths)
    closed = sshmaster.close(LOCAL, vm["name"])
    assert sorted(closed) == sorted(paths)
    assert not any(os.path.lexists(p) for p in paths)
    assert sshmaster.close(LOCAL, vm["name"]) == []


def test_a_new_boot_never_uses_the_old_master(sshd, vm):
    assert _ssh(sshd, vm, "true").returncode == 0
    logins = _logins(sshd)
    rebooted = {**vm, "boot_id": "after-reboot"}
    assert _ssh(sshd, rebooted, "true").returncode == 0
    assert _logins(sshd) == logins + 1           # its own login, not the old master
