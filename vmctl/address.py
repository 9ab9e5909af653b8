"""Agent addresses and which one a command talks to.

Forms: ``unix:///path/to/vmagent.sock``, ``http://host:port`` (bearer token),
``https://host[:port]`` (the same over TLS: an agent with ``--tls-cert``; a private CA's
certificate in ``$VMCTL_CA_FILE``),
``ssh://user@host[:port][/path/to/vmagent.sock]`` (tunnelled to the agent's unix socket on
that host; ``?agent_port=N`` tunnels to its loopback TCP port instead), and in
``VMCTL_AGENT`` also a bare port number meaning ``http://127.0.0.1:PORT``. A value without
``://`` that is not a port number names a ``[hosts.NAME]`` table of the config file.

Precedence: ``--host`` > ``$VMCTL_AGENT`` > the config's ``default_host`` > the local
agent's socket ``/var/lib/vmagent/vmagent.sock``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from typing import Protocol

from .errors import ConfigError


class HostConfig(Protocol):
    """What address resolution needs of the config (:class:`vmctl.config.Config`)."""

    default_host: str | None

    def host(self, name: str) -> "HostEntry": ...

    def host_for_address(self, address: str) -> "HostEntry | None": ...


class HostEntry(Protocol):
    name: str
    address: str

    def token(self) -> str | None: ...

DEFAULT_SOCKET = "/var/lib/vmagent/vmagent.sock"
SCHEMES = ("unix", "http", "https", "ssh")


@dataclass(frozen=True)
class Address:
    scheme: str                      # unix | http | https | ssh
    path: str | None = None          # unix: the socket; ssh: the agent's socket on the host
    host: str | None = None          # http/ssh
    port: int | None = None          # http: agent port; ssh: sshd port (None: 22/config)
    user: str | None = None          # ssh
    agent_port: int | None = None    # ssh: tunnel to 127.0.0.1:agent_port instead of path

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        if self.scheme in ("http", "https"):
            return f"{self.scheme}://{_host_port(self.host, self.port)}"
        user = f"{self.user}@" if self.user else ""
        hp = _host_port(self.host, self.port)
        if self.agent_port is not None:
            return f"ssh://{user}{hp}?agent_port={self.agent_port}"
        return f"ssh://{user}{hp}{self.path if self.path != DEFAULT_SOCKET else ''}"

    @property
    def is_local(self) -> bool:
        """The agent runs on this machine, so a VM's forwarded ports are reachable here."""
        if self.scheme == "unix":
            return True
        if self.scheme in ("http", "https"):
            return _is_loopback(self.host or "")
        return False


def _host_port(host: str | None, port: int | None) -> str:
    h = f"[{host}]" if host and ":" in host else (host or "")
    return f"{h}:{port}" if port is not None else h


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    import ipaddress        # late: only http:// addresses need it
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port(value: str, what: str, text: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"address {text!r}: {what} {value!r} is not a port number")
    return int(value)


def parse_address(text: str) -> Address:
    """Parse one address (not a config host name, not a bare port)."""
    if not isinstance(text, str) or "://" not in text:
        raise ConfigError(f"address {text!r} is not unix:///PATH, http://HOST:PORT or "
                          "ssh://USER@HOST[:PORT][/PATH]")
    scheme = text.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"address {text!r}: unknown scheme {scheme!r} (use unix, http, "
                          "https or ssh)")
    if scheme == "unix":
        path = unquote(text.split("://", 1)[1])
        if not path.startswith("/"):
            raise ConfigError(f"address {text!r}: the socket path must be absolute "
                              "(unix:///path/to/vmagent.sock)")
        return Address("unix", path=path)
    u = urlsplit(text)
    try:
        port = u.port
    except ValueError:
        raise ConfigError(f"address {text!r}: the port is not a number from 1 to "
                          "65535") from None
    if port == 0:
        raise ConfigError(f"address {text!r}: the port is not a number from 1 to 65535")
    if not u.hostname:
        raise ConfigError(f"address {text!r} has no host")
    if u.fragment:
        raise ConfigError(f"address {text!r}: unexpected '#{u.fragment}'")
    if scheme in ("http", "https"):
        if port is None and scheme == "http":
            raise ConfigError(f"address {text!r} needs a port (http://HOST:PORT)")
        if u.path not in ("", "/") or u.query or u.username:
            raise ConfigError(f"address {text!r}: only {scheme}://HOST:PORT is supported")
        return Address(scheme, host=u.hostname, port=port if port is not None else 443)
    query = parse_qs(u.query, keep_blank_values=True)
    unknown = set(query) - {"agent_port"}
    if unknown:
        raise ConfigError(f"address {text!r}: unknown option(s) {', '.join(sorted(unknown))}")
    agent_port = None
    if "agent_port" in query:
        agent_port = _port(query["agent_port"][-1], "agent_port", text)
    path = unquote(u.path) if u.path not in ("", "/") else DEFAULT_SOCKET
    return Address("ssh", path=path, host=u.hostname, port=port,
                   user=unquote(u.username) if u.username else None, agent_port=agent_port)


@dataclass(frozen=True)
class Target:
    """Where a command goes: the address, its token, and a name for messages."""

    address: Address
    token: str | None = None
    label: str = ""            # the config host name, or the address as text
    source: str = "default"    # --host | VMCTL_AGENT | default_host | default


def _interpret(value: str, config: HostConfig, source: str) -> Target:
    value = value.strip()
    if value.isdigit():
        address = Address("http", host="127.0.0.1", port=_port(value, "port", value))
    elif "://" in value:
        address = parse_address(value)
    else:
        entry = config.host(value)
        return Target(parse_address(entry.address), entry.token(), value, source)
    entry = config.host_for_address(str(address))
    if entry is not None:
        return Target(address, entry.token(), entry.name, source)
    return Target(address, _env_token(), str(address), source)


def _env_token() -> str | None:
    if os.environ.get("VMCTL_TOKEN"):
        return os.environ["VMCTL_TOKEN"].strip()
    token_file = os.environ.get("VMCTL_TOKEN_FILE")
    if token_file:
        try:
            return Path(token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(f"VMCTL_TOKEN_FILE {token_file}: {exc.strerror}") from None
    return None


def local_target(socket_path: str) -> Target:
    """The per-user agent (vmctl/localagent.py)."""
    return Target(Address("unix", path=socket_path), None, "local-user", "--local")


def resolve(host: str | None, config: HostConfig, env: dict[str, str] | None = None) -> Target:
    """The target for ``--host`` (may be None), following the precedence above."""
    env = os.environ if env is None else env
    if host:
        return _interpret(host, config, "--host")
    if env.get("VMCTL_AGENT"):
        return _interpret(env["VMCTL_AGENT"], config, "VMCTL_AGENT")
    if config.default_host:
        return _interpret(config.default_host, config, "default_host")
    return Target(Address("unix", path=DEFAULT_SOCKET), _env_token(), "local", "default")
