"""Exit codes: the agent's error codes map to documented exit codes, once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmagent import errors as agent_errors
from vmctl import errors
from vmctl.client import AgentClient
from vmctl.address import Address, Target
from vmctl.main import cli

ROOT = Path(__file__).resolve().parents[1]


def _agent_codes():
    return {cls.code for cls in vars(agent_errors).values()
            if isinstance(cls, type) and issubclass(cls, agent_errors.VMAgentError)}


def test_every_agent_code_has_an_exit_code():
    assert _agent_codes() <= set(errors.EXIT_CODES)


@pytest.mark.parametrize("code, exit_code", [
    ("bad_request", 2), ("not_found", 3), ("conflict", 4), ("timeout", 5),
    ("unreachable", 6), ("qemu_failed", 7), ("qmp_failed", 7), ("unauthorized", 8),
    ("internal", 1), ("image_error", 1), ("something_new", 1),
])
def test_mapping(code, exit_code):
    assert errors.exit_code_for(code) == exit_code
    assert errors.CLIError("x", code).exit_code == exit_code


def test_exit_codes_are_documented():
    doc = (ROOT / "docs" / "cli.md").read_text()
    for name in ("USAGE", "NOT_FOUND", "CONFLICT", "TIMEOUT", "UNREACHABLE", "QEMU_FAILED",
                 "UNAUTHORIZED", "GENERIC"):
        value = getattr(errors, name)
        assert re.search(rf"^\|\s*{value}\s*\|", doc, re.M), f"exit code {value} ({name})"


def test_agent_error_document_is_decoded():
    client = AgentClient(Target(Address("unix", path="/nonexistent")))
    body = json.dumps({"error": "conflict", "message": "VM 'a' is running",
                       "details": {"vm": "a"}}).encode()
    with pytest.raises(errors.AgentError) as info:
        client._decode("start", 409, body)
    assert (info.value.code, info.value.exit_code, info.value.details) == (
        "conflict", 4, {"vm": "a"})
    with pytest.raises(errors.AgentError) as info:
        client._decode("start", 502, b"<html>bad gateway</html>")
    assert info.value.exit_code == 1 and "HTTP 502" in info.value.message


def test_requests_are_built_from_the_operation_table():
    client = AgentClient(Target(Address("unix", path="/x")))
    assert client.request_for("status", {"name": "a"}) == ("GET", "/v1/vms/a", None)
    assert client.request_for("console_log", {"name": "a", "offset": 5, "tail": None}) == (
        "GET", "/v1/vms/a/console/log?offset=5", None)
    method, path, body = client.request_for("shutdown", {"name": "a", "timeout": 30})
    assert (method, path, json.loads(body)) == ("POST", "/v1/vms/a/shutdown", {"timeout": 30})
    assert client.request_for("delete", {"name": "a"}) == ("DELETE", "/v1/vms/a", None)
    with pytest.raises(ValueError, match="takes no parameter"):
        client.request_for("status", {"name": "a", "bogus": 1})


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    for var in ("VMCTL_AGENT", "VMCTL_CONFIG", "VMCTL_TOKEN", "VMCTL_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_unreachable_agent(clean_env):
    sock = clean_env / "none.sock"
    result = CliRunner().invoke(cli, ["--host", f"unix://{sock}", "list"])
    assert result.exit_code == 6
    assert result.stderr.startswith("vmctl: no agent at unix://")
    assert result.stdout == ""
    refused = CliRunner().invoke(cli, ["--host", "http://127.0.0.1:1", "list"])
    assert refused.exit_code == 6 and "Connection refused" in refused.stderr


def test_usage_errors_are_exit_2_and_json(clean_env):
    result = CliRunner().invoke(cli, ["--json", "create"])
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": "usage", "exit_code": 2,
                                         "message": "Missing argument 'NAME'."}
    bad_name = CliRunner().invoke(cli, ["--host", "unix:///x.sock", "show", "NoGood"])
    assert bad_name.exit_code == 2 and "is invalid" in bad_name.stderr


def test_bad_address_is_a_one_line_error(clean_env):
    result = CliRunner().invoke(cli, ["--host", "ftp://x", "list"])
    assert result.exit_code == 1
    assert result.stderr == "vmctl: address 'ftp://x': unknown scheme 'ftp' (use unix, " \
                            "http, https or ssh)\n"


def test_version(clean_env):
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and re.fullmatch(r"vmctl \d+\.\d+\.\d+\n", result.stdout)


def test_timeout_is_an_operation_parameter(tmp_path):
    client = AgentClient(Target(Address("unix", path=str(tmp_path / "none.sock"))))
    with pytest.raises(errors.Unreachable):
        client.call("shutdown", name="a", timeout=5)


# --- under --json every failure is one JSON document -----------------------------------

@pytest.mark.parametrize("args", [["--json", "list"], ["list", "--json"]])
def test_internal_error_is_one_json_document(clean_env, monkeypatch, args):
    def broken(self, op, **params):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr("vmctl.app.App.call", broken)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "error": "internal", "exit_code": 1,
        "message": "internal error: ZeroDivisionError: a bug (set VMCTL_DEBUG=1 for a "
                   "traceback)"}
    assert result.stderr.startswith("vmctl: internal error: ZeroDivisionError: a bug")
    assert "Traceback" not in result.stderr
    human = CliRunner().invoke(cli, ["list"])
    assert human.exit_code == 1 and human.stdout == "" and "a bug" in human.stderr


@pytest.mark.parametrize("json_args", [["--json"], []])
def test_binary_user_data_is_an_input_error(clean_env, json_args):
    binary = clean_env / "blob.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 10)
    result = CliRunner().invoke(cli, [*json_args, "create", "v1", "--user-data",
                                      str(binary), "--host", "unix:///nonexistent.sock"])
    assert result.exit_code == 2, result.output
    assert f"--user-data {binary}: not UTF-8 text" in result.stderr
    assert "byte 8 is 0xff" in result.stderr and "Traceback" not in result.stderr
    if json_args:
        doc = json.loads(result.stdout)
        assert doc["error"] == "bad_request" and doc["exit_code"] == 2
        assert "not UTF-8 text" in doc["message"]
    else:
        assert result.stdout == ""
