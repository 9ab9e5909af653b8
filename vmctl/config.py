"""The user's configuration: ``~/.config/vmctl/config.toml`` (or ``$VMCTL_CONFIG``).

```toml
default_host = "lab"              # a [hosts.NAME] or an address
default_image = "debian-12"
ssh_key = "~/.ssh/id_ed25519.pub" # the public key put into new VMs

[hosts.lab]
address = "ssh://me@lab.example.com"
[hosts.ci]
address = "http://10.0.0.5:8765"
token_file = "~/.config/vmctl/ci.token"
```

A missing file is an empty configuration; a malformed one is an error that names the
file and the line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

TOP_KEYS = {"default_host": str, "default_image": str, "ssh_key": str, "hosts": dict}
HOST_KEYS = {"address": str, "token_file": str}


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "vmctl"


def default_path() -> Path:
    env = os.environ.get("VMCTL_CONFIG")
    return Path(env).expanduser() if env else config_dir() / "config.toml"


@dataclass(frozen=True)
class HostEntry:
    name: str
    address: str
    token_file: Path | None = None

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"host {self.name!r}: cannot read token_file "
                              f"{self.token_file}: {exc.strerror}") from None


@dataclass(frozen=True)
class Config:
    path: Path
    exists: bool = False
    default_host: str | None = None
    default_image: str | None = None
    ssh_key: Path | None = None
    hosts: dict[str, HostEntry] = field(default_factory=dict)

    def host(self, name: str) -> HostEntry:
        if name not in self.hosts:
            where = f"config file {self.path}" + ("" if self.exists else " (which does not exist)")
            known = f"; known hosts: {', '.join(sorted(self.hosts))}" if self.hosts else ""
            raise ConfigError(f"host {name!r} is not defined in {where}{known}")
        return self.hosts[name]

    def host_for_address(self, address: str) -> HostEntry | None:
        for entry in self.hosts.values():
            if entry.address.rstrip("/") == address.rstrip("/"):
                return entry
        return None


def _line_of(text: str, pattern: str) -> int | None:
    rx = re.compile(pattern)
    for n, line in enumerate(text.splitlines(), 1):
        if rx.search(line):
            return n
    return None


def _fail(path: Path, text: str, problem: str, pattern: str | None = None) -> ConfigError:
    line = _line_of(text, pattern) if pattern else None
    where = f"{path}, line {line}" if line else str(path)
    return ConfigError(f"config file {where}: {problem}")


def _key_pattern(key: str) -> str:
    return rf'^\s*("?){re.escape(key)}\1\s*='


def _expand(value: str, base: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base.parent / p


def parse(text: str, path: Path) -> Config:
    """Parse and check a config file's text (``path`` is only for messages)."""
    import tomllib      # late: without a config file there is nothing to parse
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        if m:
            problem = msg[:m.start()].strip()
            raise ConfigError(f"config file {path}, line {m.group(1)}, column {m.group(2)}: "
                              f"{problem}") from None
        if "(at end of document)" in msg:
            last = text.count("\n") + (0 if text.endswith("\n") else 1)
            problem = msg.replace("(at end of document)", "").strip()
            raise ConfigError(f"config file {path}, line {max(last, 1)} (end of file): "
                              f"{problem}") from None
        raise ConfigError(f"config file {path}: {msg}") from None
    for key, value in data.items():
        if key not in TOP_KEYS:
            raise _fail(path, text, f"unknown key {key!r} (known: "
                        f"{', '.join(sorted(TOP_KEYS))})", _key_pattern(key))
        if not isinstance(value, TOP_KEYS[key]):
            raise _fail(path, text, f"{key} must be a "
                        f"{'table' if TOP_KEYS[key] is dict else 'string'}", _key_pattern(key))
    hosts = {}
    for name, table in data.get("hosts", {}).items():
        header = rf"^\s*\[\s*hosts\.\"?{re.escape(name)}\"?\s*\]"
        if not isinstance(table, dict):
            raise _fail(path, text, f"hosts.{name} must be a table with an address",
                        rf"{re.escape(name)}")
        for key, value in table.items():
            if key not in HOST_KEYS:
                raise _fail(path, text, f"[hosts.{name}]: unknown key {key!r} (known: "
                            f"address, token_file)", _key_pattern(key))
            if not isinstance(value, str):
                raise _fail(path, text, f"[hosts.{name}]: {key} must be a string",
                            _key_pattern(key))
        if "address" not in table:
            raise _fail(path, text, f"[hosts.{name}] has no address", header)
        from .address import parse_address   # late: address imports errors only
        try:
            parse_address(table["address"])
        except ConfigError as exc:
            raise _fail(path, text, f"[hosts.{name}]: {exc.message}",
                        _key_pattern("address")) from None
        token = table.get("token_file")
        hosts[name] = HostEntry(name, table["address"],
                                _expand(token, path) if token else None)
    ssh_key = data.get("ssh_key")
    return Config(path=path, exists=True, default_host=data.get("default_host"),
                  default_image=data.get("default_image"),
                  ssh_key=_expand(ssh_key, path) if ssh_key else None, hosts=hosts)


def load(path: Path | None = None) -> Config:
    path = path or default_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        if os.environ.get("VMCTL_CONFIG") and path == default_path():
            raise ConfigError(f"config file {path} (from VMCTL_CONFIG) does not exist") from None
        return Config(path=path)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    return parse(text, path)
