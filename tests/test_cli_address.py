"""Agent addresses and the precedence --host > VMCTL_AGENT > default_host > local socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmctl.address import DEFAULT_SOCKET, Address, parse_address, resolve
from vmctl.config import parse
from vmctl.errors import ConfigError


@pytest.mark.parametrize("text, expected", [
    ("unix:///run/vmagent.sock", Address("unix", path="/run/vmagent.sock")),
    ("http://10.0.0.5:8765", Address("http", host="10.0.0.5", port=8765)),
    ("http://[::1]:80", Address("http", host="::1", port=80)),
    ("ssh://me@lab", Address("ssh", path=DEFAULT_SOCKET, host="lab", user="me")),
    ("ssh://me@lab:2222/srv/vmagent/vmagent.sock",
     Address("ssh", path="/srv/vmagent/vmagent.sock", host="lab", port=2222, user="me")),
    ("ssh://lab?agent_port=8765",
     Address("ssh", path=DEFAULT_SOCKET, host="lab", agent_port=8765)),
])
def test_parse(text, expected):
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected      # round trip


@pytest.mark.parametrize("text, message", [
    ("lab", "is not unix:///PATH"),
    ("ftp://x", "unknown scheme 'ftp'"),
    ("unix://relative.sock", "must be absolute"),
    ("http://host", "needs a port"),
    ("http://host:99999", "not a number from 1 to 65535"),
    ("http://host:8080/api", "only http://HOST:PORT"),
    ("ssh://me@", "has no host"),
    ("ssh://lab?port=1", "unknown option"),
    ("ssh://lab?agent_port=x", "not a port number"),
])
def test_parse_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_address(text)


def test_is_local():
    assert parse_address("unix:///x.sock").is_local
    assert parse_address("http://127.0.0.1:1").is_local
    assert parse_address("http://localhost:1").is_local
    assert not parse_address("http://10.1.1.1:1").is_local
    assert not parse_address("ssh://127.0.0.1").is_local


CONFIG = """
default_host = "lab"
[hosts.lab]
address = "ssh://me@lab.example.com"
[hosts.ci]
address = "http://10.0.0.5:8765"
token_file = "ci.token"
"""


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "ci.token").write_text("secret-token\n")
    return parse(CONFIG, tmp_path / "config.toml")


def test_precedence(cfg, tmp_path):
    env = {"VMCTL_AGENT": "unix:///env.sock"}
    assert resolve("ci", cfg, env).address == Address("http", host="10.0.0.5", port=8765)
    assert resolve("ci", cfg, env).token == "secret-token"
    assert resolve("ci", cfg, env).source == "--host"
    assert resolve(None, cfg, env).address == Address("unix", path="/env.sock")
    assert resolve(None, cfg, {}).label == "lab"
    assert resolve(None, cfg, {}).source == "default_host"
    empty = parse("", tmp_path / "c.toml")
    local = resolve(None, empty, {})
    assert local.address == Address("unix", path=DEFAULT_SOCKET)
    assert local.source == "default"


def test_port_number_means_loopback_http(cfg):
    target = resolve(None, cfg, {"VMCTL_AGENT": "8765"})
    assert target.address == Address("http", host="127.0.0.1", port=8765)


def test_address_of_a_config_host_gets_its_token(cfg):
    target = resolve("http://10.0.0.5:8765", cfg, {})
    assert target.token == "secret-token" and target.label == "ci"


def test_token_from_environment(cfg, tmp_path, monkeypatch):
    (tmp_path / "t").write_text("from-file\n")
    monkeypatch.setenv("VMCTL_TOKEN_FILE", str(tmp_path / "t"))
    monkeypatch.delenv("VMCTL_TOKEN", raising=False)
    assert resolve("http://127.0.0.1:9", cfg, {}).token == "from-file"
    monkeypatch.setenv("VMCTL_TOKEN", "direct")
    assert resolve("http://127.0.0.1:9", cfg, {}).token == "direct"


def test_unknown_host_name(cfg):
    with pytest.raises(ConfigError, match="host 'nope' is not defined in config file .*"
                       "known hosts: ci, lab"):
        resolve("nope", cfg, {})


def test_unknown_host_without_config(tmp_path):
    empty_missing = parse("", tmp_path / "none.toml")
    object.__setattr__(empty_missing, "exists", False)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve("lab", empty_missing, {})


def test_token_file_relative_to_config(cfg, tmp_path):
    assert cfg.hosts["ci"].token_file == Path(tmp_path / "ci.token")


def test_https_addresses():
    from vmctl.address import parse_address
    a = parse_address("https://agent.example:8443")
    assert (a.scheme, a.host, a.port, str(a)) == ("https", "agent.example", 8443,
                                                  "https://agent.example:8443")
    assert parse_address("https://agent.example").port == 443
    assert parse_address("https://127.0.0.1:1").is_local
    with pytest.raises(ConfigError, match="only https://HOST:PORT"):
        parse_address("https://agent.example:8443/v1")
