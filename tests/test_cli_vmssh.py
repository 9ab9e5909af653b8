"""How vmctl builds ssh command lines and pins VM host keys (no VM needed)."""

from __future__ import annotations

import shlex
import sys

from vmctl import vmssh
from vmctl.address import Address, Target, parse_address

STATUS = {"name": "dev1", "ssh_host": "127.0.0.1", "ssh_port": 20022, "ssh_user": "alice",
          "created": "2026-11-25T06:00:00Z"}


def _opts(argv):
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-o")


def test_local_agent_connects_directly(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    target = Target(Address("unix", path="/var/lib/vmagent/vmagent.sock"), label="local")
    argv = vmssh.ssh_argv(target, STATUS, None, ["uname", "-r"])
    assert argv[-4:] == ["--", "127.0.0.1", "uname", "-r"]
    opts = _opts(argv)
    assert opts["User"] == "alice" and opts["Port"] == "20022"
    assert opts["HostKeyAlias"] == "vmctl.local.dev1.20261125060000"
    assert opts["StrictHostKeyChecking"] == "accept-new"
    assert opts["UserKnownHostsFile"] == str(tmp_path / "vmctl" / "known_hosts")
    assert "ProxyCommand" not in opts


def test_remote_agent_goes_through_the_proxy(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    target = Target(parse_address("ssh://me@lab"), label="lab", source="--host")
    argv = vmssh.ssh_argv(target, STATUS, None, None, batch=True)
    opts = _opts(argv)
    assert shlex.split(opts["ProxyCommand"]) == [sys.executable, "-m", "vmctl", "--host",
                                                 "lab", "proxy", "dev1"]
    assert opts["BatchMode"] == "yes" and "Port" not in opts
    assert argv[-2:] == ["--", "dev1"]


def test_recreated_vm_gets_a_new_alias():
    target = Target(parse_address("http://10.0.0.5:8765"), label="ci")
    first = vmssh.host_key_alias(target, STATUS)
    again = vmssh.host_key_alias(target, {**STATUS, "created": "2026-11-26T00:00:00Z"})
    assert first != again and first.startswith("vmctl.ci.dev1.")


def test_config_block(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    target = Target(Address("unix", path="/x.sock"), label="local")
    block = vmssh.config_block(target, STATUS, None, alias="box")
    assert block.splitlines()[:4] == ["Host box", "    HostName 127.0.0.1", "    Port 20022",
                                      "    User alice"]


CONSOLE = """[  50.1] cloud-init[480]: ci-info: no authorized SSH keys fingerprints found
<14>Nov 25 06:51:15 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----
<14>Nov 25 06:51:16 cloud-init: 256 SHA256:DeJpzm root@t1 (ED25519)
\r-----BEGIN SSH HOST KEY KEYS-----\r
ecdsa-sha2-nistp256 AAAAE2VjZHNh root@t1\r
ssh-ed25519 AAAAC3NzaC1lZDI1 root@t1\r
-----END SSH HOST KEY KEYS-----\r
t1 login: """


def test_host_keys_from_console():
    assert vmssh.host_keys_from_console(CONSOLE) == [
        "ecdsa-sha2-nistp256 AAAAE2VjZHNh", "ssh-ed25519 AAAAC3NzaC1lZDI1"]
    assert vmssh.host_keys_from_console("no keys here") == []


def test_pin_host_keys_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    calls = []

    def call(op, **params):
        calls.append((op, params))
        return {"data": CONSOLE, "offset": len(CONSOLE)}
    target = Target(Address("unix", path="/x.sock"), label="local")
    assert vmssh.pin_host_keys(call, target, STATUS)
    alias = vmssh.host_key_alias(target, STATUS)
    lines = vmssh.known_hosts_file().read_text().splitlines()
    assert lines == [f"{alias} ecdsa-sha2-nistp256 AAAAE2VjZHNh",
                     f"{alias} ssh-ed25519 AAAAC3NzaC1lZDI1"]
    assert vmssh.pin_host_keys(call, target, STATUS)
    assert len(calls) == 1                       # already pinned: no second look-up
    vmssh.forget(target, STATUS)
    assert alias not in vmssh.known_hosts_file().read_text()


def test_pin_host_keys_from_the_agents_status_without_the_console(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))

    def call(op, **params):
        raise AssertionError(f"the console is not read when the status has the keys: {op}")
    target = Target(Address("unix", path="/x.sock"), label="local")
    status = {**STATUS, "ssh_host_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1 root@t1",
                                          "not a key line", "ecdsa-sha2-nistp256 AAAAE2Vj x"]}
    assert vmssh.pin_host_keys(call, target, status)
    alias = vmssh.host_key_alias(target, status)
    assert vmssh.known_hosts_file().read_text().splitlines() == [
        f"{alias} ssh-ed25519 AAAAC3NzaC1lZDI1", f"{alias} ecdsa-sha2-nistp256 AAAAE2Vj"]


# --- a VM that does not answer ----------------------------------------------------------

def test_ssh_options_bound_a_hung_vm(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("VMCTL_SSH_CONNECT_TIMEOUT", raising=False)
    target = Target(Address("unix", path="/x.sock"), label="local")
    opts = _opts(vmssh.ssh_argv(target, STATUS, None, ["true"]))
    assert opts["ConnectTimeout"] == "20"
    assert (opts["ServerAliveInterval"], opts["ServerAliveCountMax"]) == ("15", "4")
    assert _opts(vmssh.ssh_argv(target, STATUS, None, ["true"], batch=True))[
        "ConnectTimeout"] == "10"
    monkeypatch.setenv("VMCTL_SSH_CONNECT_TIMEOUT", "3")
    assert _opts(vmssh.ssh_argv(target, STATUS, None, None))["ConnectTimeout"] == "3"
    assert "    ConnectTimeout 3" in vmssh.config_block(target, STATUS, None).splitlines()


def test_vmctl_ssh_to_a_hung_vm_gives_up_and_says_why(tmp_path, monkeypatch):
    """A hung guest: qemu's port forward accepts the connection, and no SSH banner ever
    comes. vmctl ssh must end after ConnectTimeout, with a message that says so."""
    import socket
    import time

    from click.testing import CliRunner

    from vmctl.main import cli
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    monkeypatch.setenv("VMCTL_SSH_CONNECT_TIMEOUT", "2")
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)                      # the kernel accepts; nobody ever speaks
    status = {**STATUS, "state": "running", "ssh_port": hung.getsockname()[1]}
    monkeypatch.setattr("vmctl.commands.ssh._running", lambda app, name: status)
    monkeypatch.setattr("vmctl.vmssh.pin_host_keys", lambda call, target, st: True)
    try:
        start = time.monotonic()
        result = CliRunner().invoke(cli, ["ssh", "dev1", "-H", "unix:///x.sock", "--",
                                          "true"])
        took = time.monotonic() - start
    finally:
        hung.close()
    assert result.exit_code == 255, result.output
    assert took < 15, f"took {took:.1f}s"
    assert "vmctl: ssh to VM 'dev1' failed: no SSH answer within 2s (ConnectTimeout)" in \
        result.stderr
    assert "banner exchange" in result.stderr and "vmctl console dev1 --log" in \
        result.stderr


def test_ssh_failure_reasons():
    from vmctl.commands.ssh import _ssh_failure
    refused = _ssh_failure("v", "ssh: connect to host 127.0.0.1 port 2: Connection "
                                "refused\n")
    assert refused.exit_code == 255 and "nothing answers on the VM's SSH port" in \
        refused.message
    alive = _ssh_failure("v", "Timeout, server 127.0.0.1 not responding.\n")
    assert "stopped answering for 60s" in alive.message
    denied = _ssh_failure("v", "alice@127.0.0.1: Permission denied (publickey).\n")
    assert "refused the login" in denied.message
