"""Reliability: hostile HTTP against a real agent (no guest boots). Each test names the
promise it checks (docs/reliability.md)."""

from __future__ import annotations

import http.client
import json
import socket

import pytest

from agent_helpers import AgentProcess, require_test_image

TOKEN = "reliability-token-0123456789"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdM09Ct5ZbpGEQm6BvLA/Ji8N4McDg7RPn/6+OGhCmD t@x"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    require_test_image()
    a = AgentProcess(tmp_path_factory.mktemp("rel-http") / "state", token=TOKEN).start()
    try:
        a.import_test_image()
        a.ok("POST", "/keys", {"keys": KEY})
        a.ok("POST", "/keys", {"keys": KEY, "user": "operator"})   # the token's user
        yield a
    finally:
        a.cleanup()


def tcp(agent, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={
            "Authorization": f"Bearer {TOKEN}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def test_large_valid_bodies_are_read_whole_over_tcp(agent):
    """Promise: a valid body up to the limit is never cut (64 KiB of user-data, 20 times
    over TCP: each a complete dry run)."""
    user_data = "write_files:\n" + "".join(
        f"  - path: /etc/f{i}\n    content: {'x' * 200}\n" for i in range(280))
    assert 60_000 < len(user_data.encode()) <= 64 * 1024
    body = json.dumps({"name": "big", "image": "test", "dry_run": True,
                       "user_data": user_data}).encode()
    for _ in range(20):
        status, ctype, raw = tcp(agent, "POST", "/v1/vms", body,
                                 {"Content-Type": "application/json"})
        assert status == 200, raw[:300]
        assert "/etc/f279" in json.loads(raw)["seed"]["user-data"]


def test_a_body_over_the_limit_is_413_json(agent):
    """Promise: the 1 MiB cap holds (413 with a JSON error, the agent unharmed)."""
    body = b'{"name": "x", "user_data": "' + b"a" * (2 << 20) + b'"}'
    status, ctype, raw = tcp(agent, "POST", "/v1/vms", body,
                             {"Content-Type": "application/json"})
    assert status == 413 and ctype.startswith("application/json"), raw[:200]
    assert json.loads(raw)["error"] == "too_large"
    assert agent.ok("GET", "/host")["vms"]["total"] == 0


@pytest.mark.parametrize("raw,match", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"name": "\xff\xfe"}', "not valid JSON"),
    (b'{"name": ', "not valid JSON"),
    (b'"a string"', "must be a JSON object"),
], ids=["deep", "bad-utf8", "truncated", "not-an-object"])
def test_bad_bodies_are_400_never_500(agent, raw, match):
    """Promise: malformed input is a 400 that says why."""
    status, ctype, body = agent.raw("POST", "/v1/vms", raw,
                                    {"Content-Type": "application/json"})
    assert status == 400 and ctype.startswith("application/json"), body[:200]
    assert match in json.loads(body)["message"]


def test_oversized_headers_get_a_json_error(agent):
    """Promise: every error is JSON, also those raised before routing."""
    status, ctype, raw = tcp(agent, "GET", "/v1/host", headers={"X-Big": "y" * 20_000})
    assert status in (400, 431) and ctype.startswith("application/json"), (status, raw)
    assert json.loads(raw)["error"] == "bad_request"
    assert agent.ok("GET", "/host")["version"]


def test_a_garbage_request_line_gets_a_json_error(agent):
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        data = s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n")[0] and b"application/json" in head, data[:300]
    assert json.loads(body)["error"] == "bad_request"


@pytest.mark.parametrize("path", ["/v1/vms/..%2F..%2Fetc%2Fshadow", "/v1/vms/%2e%2e",
                                  "/v1/images/..%2Fvms", "/v1/templates/a%00b",
                                  "/v1/vms/ABC/console/log"])
def test_path_traversal_is_refused_as_input(agent, path):
    """Promise: a name is a name; nothing outside the state dir is reached."""
    status, ctype, raw = agent.raw("GET", path)
    assert status in (400, 404, 405) and ctype.startswith("application/json"), raw[:200]
    assert b"root:" not in raw


def test_unknown_parameters_and_wrong_types_are_refused(agent):
    status, doc = agent.call("POST", "/vms", {"name": "t1", "image": "test",
                                              "start": False, "evil": 1})
    assert status == 400 and "evil" in doc["message"]
    status, doc = agent.call("POST", "/vms", {"name": "t1", "image": "test",
                                              "start": "yes"})
    assert status == 400 and "start" in doc["message"]
    assert agent.call("GET", "/vms/t1")[0] == 404
