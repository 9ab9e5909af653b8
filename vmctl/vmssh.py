"""Logging into a VM with the system ``ssh``.

A VM's SSH port is forwarded on the agent's host. With a local agent, ``ssh`` connects to
``ssh_host:ssh_port`` directly; with a remote one it goes through
``ProxyCommand=vmctl --host X proxy NAME`` (the agent's ``tunnel`` websocket).

Host keys: each VM *instance* is trusted on first use. vmctl keeps its own known_hosts
file (``~/.config/vmctl/known_hosts``) and names the key with
``HostKeyAlias=vmctl.<host>.<vm>.<created>``: the alias is new for a re-created VM of the
same name (which has new host keys, so no "host key changed" error), and stays the same
across reboots of one instance (so a changed key there is a real warning).
``/dev/null`` as the known_hosts file would be simpler but would never notice a change.

Better than trusting the first connection: cloud-init prints the VM's public host keys on
the serial console at first boot (``BEGIN SSH HOST KEY KEYS``), which the agent keeps in
the console log. Before the first login vmctl reads them from there (an authenticated
channel to the agent) and pins them under the alias, so even the first connection is
verified; trust on first use remains only for images that do not print their keys.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from . import config as config_mod, keys, sshmaster
from .address import Target
from .errors import ConfigError

# Bounds on a VM that does not answer (a hung or overloaded guest): ssh gives up when the
# TCP connect *and the SSH banner* take longer than ConnectTimeout (qemu's port forward
# accepts at once, so it is the banner that never comes), and drops a session whose VM
# has said nothing for ServerAliveInterval x ServerAliveCountMax seconds.
CONNECT_TIMEOUT = 20.0          # $VMCTL_SSH_CONNECT_TIMEOUT overrides it
LOGIN_CONNECT_TIMEOUT = 10.0    # the readiness login of create/wait, retried every 2 s
SERVER_ALIVE_INTERVAL = 15
SERVER_ALIVE_COUNT = 4


def connect_timeout() -> float:
    value = os.environ.get("VMCTL_SSH_CONNECT_TIMEOUT")
    if not value:
        return CONNECT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= 3600:
        raise ConfigError(f"VMCTL_SSH_CONNECT_TIMEOUT={value!r}: give seconds, from 1 "
                          "to 3600")
    return seconds


def known_hosts_file() -> Path:
    return config_mod.config_dir() / "known_hosts"


def host_key_alias(target: Target, status: dict) -> str:
    host = re.sub(r"[^A-Za-z0-9-]+", "-", target.label or "local").strip("-") or "local"
    created = re.sub(r"\D", "", str(status.get("created") or ""))
    return f"vmctl.{host}.{status['name']}" + (f".{created}" if created else "")


def proxy_command(target: Target, name: str) -> list[str]:
    host = target.label if target.source != "default" else str(target.address)
    return [sys.executable, "-m", "vmctl", "--host", host, "proxy", name]


def control_socket(target: Target, status: dict) -> Path | None:
    """The SSH control socket of this boot of the VM (vmctl/sshmaster.py), or None."""
    return sshmaster.socket_path(target, status, host_key_alias(target, status),
                                 known_hosts_file())


def ssh_options(target: Target, status: dict, cfg: config_mod.Config | None,
                *, share: bool = True) -> dict[str, str]:
    """OpenSSH options (``-o KEY=VALUE``) for reaching the VM of ``status``; with
    ``share``, the connection is shared through this boot's control socket (reused when
    a master answers there, else this ssh becomes the master)."""
    known = known_hosts_file()
    known.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    opts = {
        "User": status.get("ssh_user") or "dev",
        "HostKeyAlias": host_key_alias(target, status),
        "UserKnownHostsFile": str(known),
        "StrictHostKeyChecking": "accept-new",
        "LogLevel": "ERROR",
        "ConnectTimeout": f"{connect_timeout():g}",
        "ServerAliveInterval": str(SERVER_ALIVE_INTERVAL),
        "ServerAliveCountMax": str(SERVER_ALIVE_COUNT),
    }
    if target.address.is_local:
        opts["HostName"] = status.get("ssh_host") or "127.0.0.1"
        opts["Port"] = str(status.get("ssh_port"))
    else:
        opts["HostName"] = status["name"]
        opts["ProxyCommand"] = shlex.join(proxy_command(target, status["name"]))
    identities = keys.identity_files(cfg)
    if identities:
        opts["IdentityFile"] = str(identities[0])
    opts.update(sshmaster.options(control_socket(target, status) if share else None))
    return opts


# the order of the -o options on ssh's command line and in a config block
_ARGV_KEYS = ("User", "Port", "HostKeyAlias", "UserKnownHostsFile", "StrictHostKeyChecking",
              "LogLevel", "ConnectTimeout", "ServerAliveInterval", "ServerAliveCountMax",
              "ControlMaster", "ControlPath", "ControlPersist", "ProxyCommand")


def ssh_argv(target: Target, status: dict, cfg: config_mod.Config | None,
             command: list[str] | None = None, *, batch: bool = False,
             tty: bool | None = None, identities: tuple[Path, ...] = ()) -> list[str]:
    opts = ssh_options(target, status, cfg)
    if batch:
        opts["ConnectTimeout"] = f"{min(connect_timeout(), LOGIN_CONNECT_TIMEOUT):g}"
    argv = ["ssh"]
    for key in _ARGV_KEYS:
        if key in opts:
            argv += ["-o", f"{key}={opts[key]}"]
    for identity in (*identities, *keys.identity_files(cfg)):
        argv += ["-i", str(identity)]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    if tty is True:
        argv.append("-t")
    elif tty is False:
        argv.append("-T")
    argv += ["--", opts["HostName"], *(command or [])]
    return argv


def config_block(target: Target, status: dict, cfg: config_mod.Config | None,
                 alias: str | None = None) -> str:
    opts = ssh_options(target, status, cfg)
    lines = [f"Host {alias or status['name']}"]
    for key in ("HostName", "Port", "User", "IdentityFile", *_ARGV_KEYS[2:]):
        if key in opts:
            value = opts[key]
            if key == "ControlPath" and " " in value:
                value = f'"{value}"'
            lines.append(f"    {key} {value}")
    return "\n".join(lines) + "\n"


_KEY_BLOCK = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----",
                        re.S)
_KEY_LINE = re.compile(r"^(ssh-ed25519|ssh-rsa|ssh-dss|ecdsa-sha2-nistp\d+) ([A-Za-z0-9+/=]+)")


def host_keys_from_console(text: str) -> list[str]:
    """``TYPE BASE64`` lines of the last host key block cloud-init printed."""
    blocks = _KEY_BLOCK.findall(text)
    if not blocks:
        return []
    keys = []
    for line in blocks[-1].splitlines():
        m = _KEY_LINE.match(line.strip())
        if m:
            keys.append(f"{m.group(1)} {m.group(2)}")
    return keys


def pin_host_keys(call: Callable[..., Any], target: Target, status: dict) -> bool:
    """Put the VM's host keys into vmctl's known_hosts (once): those the agent made for
    it (``ssh_host_keys`` in its status), else those cloud-init printed on its console.
    True when the alias has keys now."""
    alias = host_key_alias(target, status)
    known = known_hosts_file()
    if sshmaster.pinned_entry(alias, known):
        return True
    keys = [" ".join(k.split()[:2]) for k in status.get("ssh_host_keys") or ()
            if _KEY_LINE.match(k)]
    if not keys:
        try:
            log = call("console_log", name=status["name"], offset=0)
        except Exception:
            return False
        keys = host_keys_from_console(log.get("data") or "")
    if not keys:
        return False
    known.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(known, "a") as f:
        for key in keys:
            f.write(f"{alias} {key}\n")
    return True


def try_login(target: Target, status: dict, cfg: config_mod.Config | None,
              timeout: float = 30.0, call: Callable[..., Any] | None = None,
              identities: tuple[Path, ...] = ()) -> tuple[bool, str]:
    """Run ``ssh ... true`` once: (logged in, last stderr line)."""
    if call is not None:
        pin_host_keys(call, target, status)
    argv = ssh_argv(target, status, cfg, ["true"], batch=True, identities=identities)
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"ssh did not finish within {timeout:g}s"
    except FileNotFoundError:
        return False, "the ssh client is not installed"
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else f"ssh exited {proc.returncode}"


def forget(target: Target, status: dict) -> None:
    """Drop the VM instance's host key from vmctl's known_hosts (after delete)."""
    known = known_hosts_file()
    if known.is_file():
        subprocess.run(["ssh-keygen", "-R", host_key_alias(target, status), "-f", str(known)],
                       capture_output=True, stdin=subprocess.DEVNULL)
