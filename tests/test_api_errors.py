"""The HTTP API's error mapping against a real agent process (no guest boots): bad input
gets a JSON 400 and leaves nothing behind; unknown things 404; wrong state 409; TCP needs
the token."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest

from agent_helpers import ROOT, AgentProcess, require_test_image

TOKEN = "0123456789abcdef-token"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    require_test_image()
    base = tmp_path_factory.mktemp("api")
    (base / "token").write_text(TOKEN + "\n")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = AgentProcess(base / "state", "--listen", f"127.0.0.1:{port}",
                     "--token-file", str(base / "token")).start()
    a.port = port
    a.import_test_image()
    yield a
    a.stop()


def nothing_left(agent) -> None:
    assert agent.ok("GET", "/vms") == {"vms": []}
    assert list((agent.state_dir / "vms").iterdir()) == []


BAD_CREATES = [
    ({"name": "../x"}, "name"),
    ({"name": "a\x00b"}, "name"),
    ({"name": "a" * 300}, "name"),
    ({"name": "ok", "memory": "2X"}, "memory"),
    ({"name": "ok", "disk": "lots"}, "disk"),
    ({"name": "ok", "user_data": "a: [unclosed"}, "user_data"),
    ({"name": "ok", "user_data": "a: '" + "x" * (64 << 10) + "'"}, "64 KiB"),
    ({"name": "ok", "colour": "red"}, "unknown"),
    ({"name": "ok", "image": "../../etc"}, "image"),
    ({"name": "ok", "image": "test", "disk": "1G"}, "smaller than the image"),
    ({"name": "ok", "image": "test", "cpu_guarantee": 4}, "segment"),
]


@pytest.mark.parametrize("body,match", BAD_CREATES)
def test_bad_create_is_400_and_leaves_nothing(agent, body, match):
    status, err = agent.call("POST", "/vms", body)
    assert status == 400, err
    assert err["error"] == "bad_request" and match in err["message"], err
    nothing_left(agent)


def test_body_must_be_a_json_object(agent):
    for raw in (b"{not json", b"[1, 2]"):
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
        conn.request("POST", "/v1/vms", body=raw,
                     headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        err = json.loads(resp.read())
        assert resp.status == 400 and err["error"] == "bad_request", err
    nothing_left(agent)


def test_unknown_image_is_404_with_a_hint(agent):
    status, err = agent.call("POST", "/vms", {"name": "ok", "image": "nope"})
    assert status == 404 and "nope" in err["message"]
    nothing_left(agent)


def test_unknown_vm_and_route_are_json_404(agent):
    status, err = agent.call("GET", "/vms/ghost")
    assert status == 404 and err == {"error": "not_found", "message": "no VM named 'ghost'",
                                     "details": {"vm": "ghost"}}
    status, err = agent.call("POST", "/vms/ghost/start")
    assert status == 404
    status, err = agent.call("GET", "/nothing-here")
    assert status == 404 and err["error"] == "not_found"


def test_dry_run_returns_argv_and_seed_and_creates_nothing(agent):
    doc = agent.ok("POST", "/vms", {"name": "dry", "image": "test", "dry_run": True})
    assert doc["dry_run"] is True and doc["argv"][0] == "qemu-system-x86_64"
    assert "-kernel" in doc["argv"]
    assert set(doc["seed"]) == {"meta-data", "user-data", "network-config"}
    assert doc["seed"]["user-data"].startswith("#cloud-config")
    assert "local-hostname: dry" in doc["seed"]["meta-data"]
    nothing_left(agent)


def test_wrong_state_and_duplicate_name_are_409(agent):
    st = agent.ok("POST", "/vms", {"name": "idle", "image": "test", "start": False})
    assert st["state"] == "stopped" and st["pid"] is None
    run = agent.state_dir / "vms" / "idle"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U",
                                      str(run / "disk.qcow2")], capture_output=True,
                                     check=True).stdout)
    assert info["backing-filename"].endswith("images/test/disk.qcow2")   # an overlay
    assert info["virtual-size"] == 10 << 30
    status, err = agent.call("POST", "/vms", {"name": "idle", "image": "test"})
    assert status == 409 and err["error"] == "conflict"
    for op in ("shutdown", "reboot", "reset", "snapshots"):
        if op == "snapshots":
            status, err = agent.call("POST", "/vms/idle/snapshots", {"snapshot": "s"})
        else:
            status, err = agent.call("POST", f"/vms/idle/{op}")
        assert status == 409 and "stopped" in err["message"], (op, err)
    status, err = agent.call("POST", "/vms/idle/snapshots", {"snapshot": "../bad"})
    assert status == 400
    doc = agent.ok("POST", "/vms/idle/config", {"cpus": 1, "memory": "1G"})
    assert doc["spec"]["cpus"] == 1 and doc["spec"]["memory"] == 1 << 30
    status, err = agent.call("POST", "/vms/idle/config", {"disk": "3G"})
    assert status == 400 and "only grow" in err["message"]
    status, err = agent.call("POST", "/vms/idle/config", {"name": "other"})
    assert status == 400
    assert agent.ok("GET", "/vms/idle")["spec"]["cpus"] == 1   # failed pushes changed nothing
    assert agent.ok("DELETE", "/vms/idle") == {"deleted": "idle"}
    nothing_left(agent)


def test_tcp_requires_the_bearer_token(agent):
    def get(headers: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
        conn.request("GET", "/v1/host", headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    assert get({})[0] == 401
    status, err = get({"Authorization": "Bearer wrong"})
    assert status == 401 and err["error"] == "unauthorized"
    status, host = get({"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and host["accel"]["name"] == "tcg"


def test_host_reports_version_accel_capacity(agent):
    host = agent.ok("GET", "/host")
    assert host["version"] and host["qemu_version"].startswith("7.")
    assert host["capacity"]["cpus"] >= 1 and host["capacity"]["memory"] > 0
    assert host["accel"]["reason"]


def test_second_agent_on_the_same_state_dir_is_refused(agent):
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "serve", "--state-dir",
                          str(agent.state_dir), "--accel", "tcg"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "another vmagent" in res.stderr


def test_version():
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "vmagent 0.1.0"
