"""The config file: good files parse; bad ones name the file and the line."""

from __future__ import annotations

import pytest

from vmctl import config
from vmctl.errors import ConfigError


def test_full_config(tmp_path):
    cfg = config.parse('default_host = "lab"\ndefault_image = "devel"\n'
                       'ssh_key = "~/.ssh/k.pub"\n[hosts.lab]\naddress = "ssh://me@lab"\n',
                       tmp_path / "c.toml")
    assert cfg.default_host == "lab" and cfg.default_image == "devel"
    assert cfg.ssh_key.name == "k.pub" and cfg.ssh_key.is_absolute()
    assert cfg.hosts["lab"].address == "ssh://me@lab"
    assert cfg.hosts["lab"].token() is None


@pytest.mark.parametrize("text, where, problem", [
    ('default_host = "lab"\nhosts = [\n', "line 2 (end of file)", "Invalid"),
    ('default_host = lab\n', "line 1, column 16", "Invalid value"),
    ('default_image = "x"\ndefualt_host = "lab"\n', "line 2", "unknown key 'defualt_host'"),
    ('default_host = 3\n', "line 1", "default_host must be a string"),
    ('[hosts.lab]\ntoken_file = "t"\n', "line 1", r"\[hosts.lab\] has no address"),
    ('[hosts.lab]\naddress = "lab.example.com"\n', "line 2", "is not unix:///PATH"),
    ('[hosts.lab]\naddress = "ssh://x"\nport = 22\n', "line 3", "unknown key 'port'"),
    ('[hosts.lab]\naddress = 5\n', "line 2", "address must be a string"),
])
def test_errors_name_file_and_line(tmp_path, text, where, problem):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = info.value.message
    assert message.startswith(f"config file {path}, {where}"), message
    assert __import__("re").search(problem, message), message


def test_missing_default_file_is_empty(tmp_path, monkeypatch):
    monkeypatch.delenv("VMCTL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    cfg = config.load()
    assert not cfg.exists and cfg.hosts == {}
    assert cfg.path == tmp_path / "vmctl" / "config.toml"


def test_missing_vmctl_config_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VMCTL_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="nope.toml .from VMCTL_CONFIG. does not exist"):
        config.load()


def test_unreadable_token_file(tmp_path):
    cfg = config.parse('[hosts.ci]\naddress = "http://h:1"\ntoken_file = "missing"\n',
                       tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="cannot read token_file .*missing"):
        cfg.hosts["ci"].token()


def test_cli_reports_config_error(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from vmctl.main import cli
    path = tmp_path / "config.toml"
    path.write_text("default_host = 'x'\n[hosts.x]\naddress = 'http://h'\n")
    monkeypatch.setenv("VMCTL_CONFIG", str(path))
    monkeypatch.delenv("VMCTL_AGENT", raising=False)
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 1
    assert result.stderr == (f"vmctl: config file {path}, line 3: [hosts.x]: address "
                             "'http://h' needs a port (http://HOST:PORT)\n")
    assert result.stdout == ""
