"""The HTTP API of a real ``vmagent serve`` process (no guest boots): the host report,
JSON errors (400/401/404/409) that leave nothing behind, dry runs, a stopped VM's files,
push_config, delete, the TCP token, and how the agent starts and stops."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import vmagent
from agent_helpers import AgentProcess, free_port
from vmagent.identity import seed as vseed

ROOT = Path(__file__).resolve().parents[1]
IMAGE_DIR = Path(os.environ.get("VMCTL_TEST_IMAGE_DIR", "/var/cache/vm-test-image"))
TOKEN = "api-test-token-0123456789"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdM09Ct5ZbpGEQm6BvLA/Ji8N4McDg7RPn/6+OGhCmD t@x"
G = 1 << 30


# --- a real agent -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    for f in ("debian-12-test.qcow2", "vmlinuz", "initrd.img"):
        if not (IMAGE_DIR / f).is_file():
            pytest.fail(f"test image missing: {IMAGE_DIR / f}")
    base = tmp_path_factory.mktemp("api")
    a = AgentProcess(base / "state", token=TOKEN).start()
    try:
        a.ok("POST", "/keys", {"keys": KEY})    # root's key: its VMs' owner account
        a.image = a.ok("POST", "/images", {
            "image": "test", "path": str(IMAGE_DIR / "debian-12-test.qcow2"),
            "kernel": str(IMAGE_DIR / "vmlinuz"), "initrd": str(IMAGE_DIR / "initrd.img"),
            "append": "root=LABEL=rootfs console=ttyS0 rw no_timer_check"})
        yield a
    finally:
        a.cleanup()


@pytest.fixture(autouse=True)
def no_leftover_vms(request):
    """Whatever a test leaves behind (a bad create that was wrongly accepted) is deleted,
    so that one failure does not fail every later test."""
    yield
    if "agent" in request.fixturenames:
        agent = request.getfixturevalue("agent")
        for vm in agent.ok("GET", "/vms")["vms"]:
            agent.call("DELETE", f"/vms/{vm['name']}")


def assert_nothing_created(agent: AgentProcess) -> None:
    """No VM listed and no run dir (not even a staging or deletion leftover)."""
    assert agent.ok("GET", "/vms") == {"vms": []}
    assert sorted(os.listdir(agent.state_dir / "vms")) == []


def assert_error(status: int, doc: dict, want_status: int, code: str) -> str:
    assert status == want_status, doc
    assert doc["error"] == code, doc
    msg = doc["message"]
    assert isinstance(msg, str) and msg and "\n" not in msg and len(msg) < 400, doc
    assert "Traceback" not in msg
    return msg


class created:
    """A stopped VM for one test, deleted afterwards."""

    def __init__(self, agent: AgentProcess, name: str, **fields) -> None:
        self.agent, self.name = agent, name
        self.fields = {"name": name, "image": "test", "start": False, **fields}

    def __enter__(self) -> dict:
        status, doc = self.agent.call("POST", "/vms", self.fields)
        assert status == 201, doc
        return doc

    def __exit__(self, *exc) -> None:
        status, doc = self.agent.call("DELETE", f"/vms/{self.name}")
        assert status in (200, 404), doc


def qemu_img_info(path: Path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                                     capture_output=True, check=True).stdout)


# --- version and host ---------------------------------------------------------------------

def test_version_flag_prints_the_version():
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"vmagent {vmagent.__version__}"


def test_host_report(agent):
    host = agent.ok("GET", "/host")
    assert host["version"] == vmagent.__version__
    assert host["accel"]["name"] == "tcg" and host["accel"]["probed"] is False
    assert "configuration" in host["accel"]["reason"]
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout
    assert host["qemu_version"] and host["qemu_version"] in qv
    cap = host["capacity"]
    assert cap["cpus"] == os.cpu_count() and cap["memory"] > 0 and cap["disk_free"] > 0
    assert host["allocated"] == {"cpus": 0, "memory": 0}
    assert host["vms"]["running"] == 0
    assert host["state_dir"] == str(agent.state_dir.resolve())


def test_imported_image_is_listed(agent):
    assert agent.image["name"] == "test" and agent.image["boot"] == "kernel"
    images = agent.ok("GET", "/images")["images"]
    assert [i["name"] for i in images] == ["test"]


# --- 404 / 405 ------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", [
    ("GET", "/vms/ghost"), ("DELETE", "/vms/ghost"), ("POST", "/vms/ghost/start"),
    ("POST", "/vms/ghost/shutdown"), ("POST", "/vms/ghost/config"),
    ("GET", "/vms/ghost/snapshots"), ("GET", "/vms/ghost/console/log"),
])
def test_unknown_vm_is_json_404(agent, method, path):
    status, doc = agent.call(method, path, {} if method != "GET" else None)
    msg = assert_error(status, doc, 404, "not_found")
    assert "ghost" in msg


@pytest.mark.parametrize("path", ["/v1/nothing", "/v2/host", "/", "/v1/vms/a/b/c/d",
                                  "/v1/host/"])
def test_unknown_route_is_json_404(agent, path):
    status, ctype, raw = agent.raw("GET", path)
    assert ctype.startswith("application/json")
    assert_error(status, json.loads(raw), 404, "not_found")


def test_wrong_method_is_json(agent):
    status, doc = agent.call("PUT", "/host", {})
    assert status == 405 and doc["error"] == "bad_request" and "PUT" in doc["message"]


def test_invalid_vm_name_in_the_path_is_400(agent):
    status, doc = agent.call("GET", "/vms/Bad_Name")
    assert_error(status, doc, 400, "bad_request")


# --- bad creates ------------------------------------------------------------------------

BOMB = "a0: &a0 [" + ",".join(["xxxxxxxxxx"] * 9) + "]\n" + "".join(
    f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 9))

BAD_CREATES = {
    "dotdot": ({"name": "../x"}, "name"),
    "nul": ({"name": "a\x00b"}, "name"),
    "300 chars": ({"name": "a" * 300}, "300 characters"),
    "upper": ({"name": "Abc"}, "name"),
    "leading dash": ({"name": "-x"}, "name"),
    "empty name": ({"name": ""}, "name"),
    "name not a string": ({"name": 7}, "name"),
    "no name": ({"cpus": 2}, "name is required"),
    "bad size": ({"name": "ok", "memory": "2X"}, "memory"),
    "bad disk size": ({"name": "ok", "disk": "2X"}, "disk"),
    "negative size": ({"name": "ok", "disk": -1}, "disk"),
    "cpus": ({"name": "ok", "cpus": 0}, "cpus"),
    "invalid yaml": ({"name": "ok", "user_data": "a: [unclosed\n"}, "invalid YAML"),
    "yaml not a mapping": ({"name": "ok", "user_data": "- a\n- b\n"}, "mapping"),
    "user_data over 64 KiB": ({"name": "ok", "user_data": "a: '" + "x" * (64 << 10) + "'"},
                              "64 KiB"),
    "user_data alias bomb": ({"name": "ok", "user_data": BOMB}, "expands"),
    "user_data nested": ({"name": "ok", "user_data": "a: " + "[" * 700 + "]" * 700},
                         "nested"),
    "unknown field": ({"name": "ok", "colour": "red"}, "colour"),
    "bad ssh key": ({"name": "ok", "ssh_keys": ["ssh-rsa"]}, "ssh_keys"),
    "root admin": ({"name": "ok", "admins": ["root"]}, "admins"),
    "segment": ({"name": "ok", "segment": "prod"}, "segment"),
    "dev guarantee": ({"name": "ok", "cpu_guarantee": 4}, "segment"),
    "guarantee > limit": ({"name": "ok", "ram_guarantee": "4G", "ram_limit": "1G"},
                          "ram_guarantee"),
    "bad image name": ({"name": "ok", "image": "../../etc"}, "image"),
    "disk below image": ({"name": "ok", "disk": "1G"}, "smaller than the image"),
    "bad timeout-ish param": ({"name": "ok", "timeout": 5}, "unknown parameter"),
}


@pytest.mark.parametrize("body,match", BAD_CREATES.values(), ids=BAD_CREATES.keys())
def test_bad_create_is_400_and_creates_nothing(agent, body, match):
    body = {"image": "test", "start": False, **body}
    status, doc = agent.call("POST", "/vms", body)
    msg = assert_error(status, doc, 400, "bad_request")
    assert match in msg, msg
    assert "\x00" not in msg
    assert_nothing_created(agent)


@pytest.mark.parametrize("raw,match", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"dev1"', "JSON object"),
    (b"null", "JSON object"),
    (b"\xff\xfe", "JSON"),
    (b"", "name is required"),
])
def test_body_must_be_a_json_object(agent, raw, match):
    status, ctype, data = agent.raw("POST", "/v1/vms", raw,
                                    {"Content-Type": "application/json"})
    msg = assert_error(status, json.loads(data), 400, "bad_request")
    assert match in msg
    assert_nothing_created(agent)


def test_unknown_image_is_refused_clearly(agent):
    for dry_run in (False, True):
        status, doc = agent.call("POST", "/vms", {"name": "ok", "image": "nope",
                                                  "start": False, "dry_run": dry_run})
        assert status in (400, 404), doc
        assert "'nope'" in doc["message"] and "not in the store" in doc["message"]
        assert_nothing_created(agent)


# --- dry run --------------------------------------------------------------------------

def test_dry_run_returns_argv_and_seed_and_creates_nothing(agent):
    doc = agent.ok("POST", "/vms", {"name": "dry1", "image": "test", "dry_run": True,
                                    "ssh_keys": [KEY], "cpus": 3,
                                    "user_data": "packages: [htop]\n"})
    assert doc["dry_run"] is True and doc["image"] == "test"
    spec = doc["spec"]
    assert (spec["name"], spec["cpus"], spec["memory"], spec["disk"]) == \
        ("dry1", 3, 2 * G, 10 * G)
    assert spec["admins"] == [] and spec["segment"] == "dev"
    assert spec["ssh_keys"] == [KEY]

    argv = doc["argv"]
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[0] == "qemu-system-x86_64"
    opt = dict(zip(argv, argv[1:]))
    assert opt["-accel"] == "tcg,thread=multi,tb-size=256" and opt["-smp"] == "3"
    assert opt["-pidfile"] == str(agent.state_dir.resolve() / "vms" / "dry1" / "qemu.pid")
    assert opt["-kernel"] == str(agent.state_dir.resolve() / "images" / "test" / "vmlinuz")
    assert opt["-append"] == "root=LABEL=rootfs console=ttyS0 rw no_timer_check"

    seed = doc["seed"]
    assert set(seed) == {"meta-data", "user-data", "network-config"}
    meta = yaml.safe_load(seed["meta-data"])
    assert meta["local-hostname"] == "dry1" and meta["instance-id"].startswith("dry1-")
    assert seed["user-data"].startswith("#cloud-config\n")
    user = yaml.safe_load(seed["user-data"])
    assert "htop" in user["packages"]
    assert user["users"][0]["name"] == "dev"
    assert user["users"][0]["ssh_authorized_keys"] == [KEY]
    net = yaml.safe_load(seed["network-config"])
    mac = net["ethernets"]["eth0"]["match"]["macaddress"]
    assert f"virtio-net-pci,netdev=net0,mac={mac}" in argv

    assert agent.call("GET", "/vms/dry1")[0] == 404
    assert_nothing_created(agent)


# --- a stopped VM -----------------------------------------------------------------------

def test_create_without_start_makes_a_stopped_vm(agent):
    with created(agent, "vm1", ssh_keys=[KEY]) as st:
        run = agent.state_dir.resolve() / "vms" / "vm1"
        assert st["name"] == "vm1" and st["state"] == "stopped"
        assert st["pid"] is None and st["ssh_ready"] is False and st["link_alive"] is False
        assert st["run_dir"] == str(run)
        assert st["spec"]["image"] == "test" and st["spec"]["ssh_keys"] == [KEY]
        assert st["ssh_user"] == "dev" and isinstance(st["ssh_port"], int)

        info = qemu_img_info(run / "disk.qcow2")
        assert info["format"] == "qcow2"
        base = agent.state_dir.resolve() / "images" / "test" / "disk.qcow2"
        assert info["backing-filename"] == str(base)
        assert info.get("backing-filename-format") == "qcow2"
        assert info["virtual-size"] == st["spec"]["disk"] == 10 * G

        files = vseed.read_seed_iso(run / "seed.iso")
        assert set(files) == {"meta-data", "user-data", "network-config"}
        assert b"local-hostname: vm1" in files["meta-data"]

        assert json.loads((run / "spec.json").read_text()) == {"format": 1, **st["spec"]}
        state = json.loads((run / "state.json").read_text())
        assert state["state"] == "stopped" and state["ssh_port"] == st["ssh_port"]
        assert not (run / "qemu.pid").exists() and not (run / "qmp.sock").exists()

        assert [v["name"] for v in agent.ok("GET", "/vms")["vms"]] == ["vm1"]
        assert agent.ok("GET", "/vms/vm1")["spec"] == st["spec"]
        assert agent.ok("GET", "/host")["vms"] == {"total": 1, "running": 0}
        log = agent.ok("GET", "/vms/vm1/console/log")
        assert log == {"offset": 0, "size": 0, "data": ""}
        assert agent.ok("GET", "/vms/vm1/snapshots") == {"snapshots": []}


def test_same_name_twice_is_409(agent):
    with created(agent, "twice", cpus=1) as first:
        for extra in ({}, {"dry_run": True}, {"cpus": 4}):
            status, doc = agent.call("POST", "/vms", {"name": "twice", "image": "test",
                                                      "start": False, **extra})
            msg = assert_error(status, doc, 409, "conflict")
            assert "twice" in msg and "exists" in msg
        assert agent.ok("GET", "/vms/twice")["spec"] == first["spec"]   # untouched


@pytest.mark.parametrize("op,body", [("shutdown", None), ("reboot", None),
                                     ("snapshots", {"snapshot": "s1"}), ("reset", None),
                                     ("poweroff", None), ("hard_reset", None),
                                     ("shutdown", {"timeout": 5})])
def test_lifecycle_ops_on_a_stopped_vm_are_409(agent, op, body):
    with created(agent, "idle"):
        status, doc = agent.call("POST", f"/vms/idle/{op}", body or {})
        msg = assert_error(status, doc, 409, "conflict")
        assert "stopped" in msg
        st = agent.ok("GET", "/vms/idle")
        assert st["state"] == "stopped" and st["pid"] is None


def test_push_config_on_a_stopped_vm(agent):
    with created(agent, "cfg", ssh_keys=[KEY]) as before:
        run = agent.state_dir / "vms" / "cfg"
        old_meta = vseed.read_seed_iso(run / "seed.iso")["meta-data"]
        st = agent.ok("POST", "/vms/cfg/config", {"cpus": 4, "memory": "1G",
                                                  "user_data": "packages: [jq]\n"})
        assert st["state"] == "stopped" and st["config_pending"] is False
        spec = st["spec"]
        assert spec["cpus"] == 4 and spec["memory"] == G
        assert spec["ssh_keys"] == [KEY] and spec["disk"] == before["spec"]["disk"]
        assert json.loads((run / "spec.json").read_text()) == {"format": 1, **spec}
        files = vseed.read_seed_iso(run / "seed.iso")
        assert files["meta-data"] != old_meta                 # a new instance-id
        assert "jq" in yaml.safe_load(files["user-data"])["packages"]
        assert agent.ok("GET", "/vms/cfg")["spec"] == spec

        # a bigger disk is accepted (applied at the next start)
        assert agent.ok("POST", "/vms/cfg/config", {"disk": "12G"})["spec"]["disk"] == 12 * G
        for body, match in [({"disk": "11G"}, "only grow"),
                            ({"disk": "1G"}, "smaller"),
                            ({"cpus": 0}, "cpus"),
                            ({"image": "other"}, "image"),
                            ({"colour": "red"}, "colour"),
                            ({"name": "other"}, "name"),
                            ({"user_data": "a: ["}, "YAML")]:
            status, doc = agent.call("POST", "/vms/cfg/config", body)
            assert match in assert_error(status, doc, 400, "bad_request"), (body, doc)
        after = agent.ok("GET", "/vms/cfg")["spec"]
        assert after == {**spec, "disk": 12 * G}              # failed pushes changed nothing
        assert json.loads((run / "spec.json").read_text()) == {"format": 1, **after}


def test_delete_removes_the_run_dir(agent):
    with created(agent, "gone"):
        run = agent.state_dir / "vms" / "gone"
        assert run.is_dir()
        assert agent.ok("DELETE", "/vms/gone") == {"deleted": "gone"}
        assert not run.exists()
        assert agent.call("GET", "/vms/gone")[0] == 404
        status, doc = agent.call("DELETE", "/vms/gone")
        assert_error(status, doc, 404, "not_found")
        assert_nothing_created(agent)
    # the name can be used again
    with created(agent, "gone") as st:
        assert st["state"] == "stopped"
    assert_nothing_created(agent)


# --- TCP and the token ------------------------------------------------------------------

def tcp(agent: AgentProcess, method: str, path: str, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        assert resp.getheader("Content-Type", "").startswith("application/json")
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": TOKEN},
    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer "},
])
def test_tcp_without_the_right_token_is_401(agent, headers):
    for path in ("/v1/host", "/v1/vms", "/v1/nothing"):       # even unknown routes
        status, doc = tcp(agent, "GET", path, headers)
        msg = assert_error(status, doc, 401, "unauthorized")
        assert TOKEN not in msg


def test_tcp_with_the_token(agent):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, host = tcp(agent, "GET", "/v1/host", auth)
    assert status == 200 and host["version"] == vmagent.__version__
    status, doc = tcp(agent, "GET", "/v1/vms", auth)
    assert status == 200 and doc == {"vms": []}
    status, doc = tcp(agent, "GET", "/v1/nothing", auth)
    assert_error(status, doc, 404, "not_found")


def test_tcp_listens_on_localhost_only(agent):
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", agent.port), timeout=2).close()


# --- starting and stopping the agent --------------------------------------------------

def test_unix_socket_mode(agent):
    assert oct(agent.socket.stat().st_mode & 0o777) == oct(0o660)


def test_second_agent_on_the_same_state_dir_is_refused(agent):
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "serve", "--state-dir",
                          str(agent.state_dir), "--accel", "tcg"], cwd=ROOT,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0
    assert "another vmagent is running" in res.stderr and "Traceback" not in res.stderr
    assert "ready" not in res.stdout
    # the running agent is unharmed and still owns its socket
    assert agent.proc.poll() is None
    assert agent.ok("GET", "/host")["version"] == vmagent.__version__


def test_second_agent_on_the_same_socket_is_refused(agent, tmp_path):
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "serve", "--state-dir",
                          str(tmp_path / "other"), "--socket", str(agent.socket),
                          "--accel", "tcg"], cwd=ROOT, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "another agent is listening" in res.stderr
    assert agent.ok("GET", "/host")["version"] == vmagent.__version__


def test_a_token_file_readable_by_others_is_refused(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o644)
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "serve", "--state-dir",
                          str(tmp_path / "s"), "--accel", "tcg", "--listen",
                          f"127.0.0.1:{free_port()}", "--token-file", str(token)],
                         cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1, res.stderr
    assert "readable by others" in res.stderr and "chmod 600" in res.stderr


def test_sigterm_stops_cleanly_and_the_state_dir_is_reusable(tmp_path):
    a = AgentProcess(tmp_path / "state").start()
    try:
        assert a.socket.exists()
        assert a.ok("GET", "/host")["vms"]["total"] == 0
        assert a.stop(signal.SIGTERM) == 0
        assert not a.socket.exists() and not a.socket.is_symlink()
        assert "Traceback" not in a.log.read_text()
        # the next agent on the same state dir starts and answers
        b = AgentProcess(tmp_path / "state").start()
        try:
            assert b.ok("GET", "/vms") == {"vms": []}
        finally:
            assert b.stop() == 0
    finally:
        a.stop()


def test_stale_socket_of_a_killed_agent_is_replaced(tmp_path):
    a = AgentProcess(tmp_path / "state").start()
    a.stop(signal.SIGKILL)
    assert a.socket.exists()                               # left behind by SIGKILL
    b = AgentProcess(tmp_path / "state").start()
    try:
        assert b.ok("GET", "/vms") == {"vms": []}
    finally:
        assert b.stop() == 0


def test_host_keys_made_by_the_agent_are_reported_and_kept_by_push_config(agent):
    with created(agent, "keys", ssh_keys=[KEY]) as st:
        run = agent.state_dir / "vms" / "keys"
        pubs = st["ssh_host_keys"]
        assert [p.split()[0] for p in pubs] == ["ssh-ed25519", "ecdsa-sha2-nistp256"]
        assert all(p.endswith(" root@keys") for p in pubs)
        assert (run / "host_keys.json").stat().st_mode & 0o777 == 0o600
        ud = yaml.safe_load(vseed.read_seed_iso(run / "seed.iso")["user-data"])
        assert [ud["ssh_keys"]["ed25519_public"], ud["ssh_keys"]["ecdsa_public"]] == pubs
        assert agent.ok("GET", "/vms")["vms"][0]["ssh_host_keys"] == pubs
        # a new instance-id: cloud-init installs the same keys again
        agent.ok("POST", "/vms/keys/config", {"user_data": "packages: [jq]\n"})
        ud2 = yaml.safe_load(vseed.read_seed_iso(run / "seed.iso")["user-data"])
        assert ud2["ssh_keys"] == ud["ssh_keys"]
        assert agent.ok("GET", "/vms/keys")["ssh_host_keys"] == pubs
        # user-data that makes its own keys wins; the agent no longer claims to know them
        agent.ok("POST", "/vms/keys/config", {"user_data": "ssh_genkeytypes: [rsa]\n"})
        ud3 = yaml.safe_load(vseed.read_seed_iso(run / "seed.iso")["user-data"])
        assert "ssh_keys" not in ud3 and ud3["ssh_genkeytypes"] == ["rsa"]
        assert agent.ok("GET", "/vms/keys")["ssh_host_keys"] is None
        assert not (run / "host_keys.json").exists()
