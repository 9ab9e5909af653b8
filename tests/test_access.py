"""Users and access, with real people on real transports (no guest boots: VMs are
created stopped): local users on the unix socket (SO_PEERCRED), tokens bound to users
on TCP, an SSH-tunnelled caller through a private sshd; ownership, 403 for every VM
operation of the table, filtered lists, the key registry (directory and URL), the
token store and the audit log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import pytest

from access_helpers import GROUP, OPERATORS, People, SharedAgent, ensure_group
from agent_helpers import ROOT, keypair, require_test_image
from sshd_helpers import start_sshd
from vmagent import ops

ALICE, BOB, OLGA = "vmacc-alice", "vmacc-bob", "vmacc-olga"   # olga: an operator
TOKEN_FILE = "operator-token-0123456789abcdef"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_test_image()
    base = tmp_path_factory.mktemp("access")
    for g in (GROUP, OPERATORS):
        ensure_group(g)
    people = People(base)
    people.add(ALICE, GROUP)
    people.add(BOB, GROUP)
    people.add(OLGA, GROUP, OPERATORS)
    agent = SharedAgent(base, token=TOKEN_FILE).start()
    try:
        agent.import_test_image()
        for who in (ALICE, BOB, OLGA):       # each user adds their own key
            status, doc = agent.as_user(who, "POST", "/keys", {"keys": people.pub(who)})
            assert status == 201, doc
        status, doc = agent.as_user(ALICE, "POST", "/vms",
                                    {"name": "alice1", "image": "test", "start": False})
        assert status == 201, doc
        yield {"agent": agent, "people": people, "base": base}
    finally:
        agent.cleanup()
        people.remove()


def _token(agent, user: str, role: str = "user") -> str:
    res = subprocess.run([sys.executable, "-m", "vmagent.cli", "token", "add", user,
                          "--role", role, "--state-dir", str(agent.state_dir)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return res.stdout.strip()


def _tcp(agent, token: str | None, method: str, path: str, body=None) -> tuple[int, dict]:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, "/v1" + path, body=json.dumps(body) if body else None,
                     headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


# --- identity and ownership on the unix socket ----------------------------------------

def test_the_creator_owns_the_vm_and_logs_in_as_themself(world):
    status, st = world["agent"].as_user(ALICE, "GET", "/vms/alice1")
    assert status == 200, st
    assert st["owner"] == ALICE and st["accounts"] == [ALICE] and st["ssh_user"] == ALICE
    # the seed gives alice's account alice's key, nobody else's
    from vmagent.identity.seed import read_seed_iso
    import yaml
    run = world["agent"].state_dir / "vms" / "alice1"
    users = yaml.safe_load(read_seed_iso(run / "seed.iso")["user-data"])["users"]
    assert [(u["name"], u["ssh_authorized_keys"]) for u in users] == [
        (ALICE, [world["people"].pub(ALICE)])]


def _vm_rows():
    return [op for op in ops.OPERATIONS if op.access == "owner"]


def _path(op, name: str) -> str:
    return op.render_path({"name": name})[len(ops.API_PREFIX):]


@pytest.mark.parametrize("op", _vm_rows(), ids=lambda op: op.name)
def test_another_user_gets_403_for_every_vm_operation(world, op):
    agent = world["agent"]
    status, doc = agent.as_user(BOB, op.method, _path(op, "alice1"),
                                {} if op.method != "GET" else None)
    assert status == 403, (op.name, doc)
    assert doc["error"] == "forbidden"
    assert "alice1" in doc["message"] and BOB in doc["message"] and ALICE in doc["message"]
    # the VM is untouched
    assert agent.ok("GET", "/vms/alice1")["state"] == "stopped"


def test_every_vm_row_of_the_table_is_owner_checked():
    """The check is derived from the table: a row that names a VM cannot be open."""
    for op in ops.OPERATIONS:
        if op.target == "vm" and "name" in op.path_params:
            assert op.access == "owner", op.name
    assert {op.name for op in _vm_rows()} >= {"status", "delete", "start", "console",
                                              "tunnel", "push_config", "snapshot"}


def test_lists_show_what_the_caller_may_operate(world):
    agent = world["agent"]
    assert [v["name"] for v in agent.as_user(ALICE, "GET", "/vms")[1]["vms"]] == ["alice1"]
    assert agent.as_user(BOB, "GET", "/vms")[1]["vms"] == []
    status, doc = agent.as_user(BOB, "GET", "/vms?all=true")
    assert status == 403 and "operators" in doc["message"]
    # an operator sees their own by default and every VM with all
    assert agent.as_user(OLGA, "GET", "/vms")[1]["vms"] == []
    assert [v["name"] for v in agent.as_user(OLGA, "GET", "/vms?all=true")[1]["vms"]] == [
        "alice1"]


def test_an_operator_may_operate_any_vm(world):
    agent = world["agent"]
    status, st = agent.as_user(OLGA, "GET", "/vms/alice1")
    assert status == 200 and st["owner"] == ALICE
    assert st["ssh_user"] == ALICE           # olga has no account there: the owner's


def test_images_and_templates_are_for_everyone_to_use_and_operators_to_change(world):
    agent = world["agent"]
    assert agent.as_user(BOB, "GET", "/images")[0] == 200
    assert agent.as_user(BOB, "GET", "/templates")[0] == 200
    for method, path, body in (("POST", "/images", {"image": "x", "path": "/etc/hostname"}),
                               ("DELETE", "/images/test", None),
                               ("POST", "/images/test/pull", {}),
                               ("POST", "/templates", {"template": "t"})):
        status, doc = agent.as_user(BOB, method, path, body)
        assert status == 403 and "operators" in doc["message"], (path, doc)
    assert agent.as_user(BOB, "GET", "/host/log")[0] == 403


def test_admins_added_by_push_config_may_operate_it(world):
    agent = world["agent"]
    status, st = agent.as_user(ALICE, "POST", "/vms/alice1/config", {"admins": [BOB]})
    assert status == 200, st
    assert st["accounts"] == [ALICE, BOB]
    status, st = agent.as_user(BOB, "GET", "/vms/alice1")
    assert status == 200 and st["ssh_user"] == BOB
    assert [v["name"] for v in agent.as_user(BOB, "GET", "/vms")[1]["vms"]] == ["alice1"]
    # and lose it when removed
    assert agent.as_user(ALICE, "POST", "/vms/alice1/config", {"admins": []})[0] == 200
    assert agent.as_user(BOB, "GET", "/vms/alice1")[0] == 403


def test_a_person_without_keys_is_refused_and_nothing_is_made(world):
    agent = world["agent"]
    status, doc = agent.as_user(ALICE, "POST", "/vms", {"name": "nokeys", "image": "test",
                                                        "start": False,
                                                        "admins": ["nosuchperson"]})
    assert status == 400 and "nosuchperson" in doc["message"]
    assert "vmctl key add" in doc["message"]
    assert not (agent.state_dir / "vms" / "nokeys").exists()
    assert agent.call("GET", "/vms/nokeys")[0] == 404


def test_keys_are_each_users_own(world):
    agent = world["agent"]
    people = world["people"]
    status, doc = agent.as_user(BOB, "GET", "/keys")
    assert status == 200 and [k["key"] for k in doc["keys"]] == [people.pub(BOB)]
    assert doc["keys"][0]["fingerprint"].startswith("SHA256:")
    status, doc = agent.as_user(BOB, "POST", "/keys", {"user": ALICE,
                                                      "keys": people.pub(BOB)})
    assert status == 403 and ALICE in doc["message"]
    assert agent.as_user(BOB, "GET", f"/keys?user={ALICE}")[0] == 403
    status, doc = agent.as_user(BOB, "POST", "/keys", {"keys": "not a key"})
    assert status == 400
    # an operator manages anyone's entry
    status, doc = agent.as_user(OLGA, "GET", f"/keys?user={ALICE}")
    assert status == 200 and doc["user"] == ALICE


def test_key_remove_by_fingerprint(world, tmp_path):
    agent = world["agent"]
    pub = keypair(tmp_path).with_suffix(".pub").read_text().strip()
    agent.ok("POST", "/keys", {"user": "vmacc-tmp", "keys": pub})
    fp = agent.ok("GET", "/keys?user=vmacc-tmp")["keys"][0]["fingerprint"]
    doc = agent.ok("DELETE", "/keys", {"user": "vmacc-tmp", "key": fp})
    assert [k["key"] for k in doc["removed"]] == [pub]
    assert agent.ok("GET", "/keys?user=vmacc-tmp")["keys"] == []
    assert agent.call("DELETE", "/keys", {"user": "vmacc-tmp", "key": fp})[0] == 404


# --- TCP: tokens bound to people ----------------------------------------------------------

def test_tokens_bind_callers_to_people(world):
    agent = world["agent"]
    carol, dave = _token(agent, "vmacc-carol"), _token(agent, "vmacc-dave")
    pubkey = world["people"].pub(ALICE)
    for tok in (carol, dave):
        assert _tcp(agent, tok, "POST", "/keys", {"keys": pubkey})[0] == 201
    status, st = _tcp(agent, carol, "POST", "/vms", {"name": "carol1", "image": "test",
                                                    "start": False})
    assert status == 201 and st["owner"] == "vmacc-carol"
    status, doc = _tcp(agent, dave, "POST", "/vms/carol1/start")
    assert status == 403 and "vmacc-dave" in doc["message"]
    assert _tcp(agent, dave, "GET", "/vms")[1]["vms"] == []
    assert _tcp(agent, TOKEN_FILE, "GET", "/vms?all=true")[0] == 200   # --token-file
    assert _tcp(agent, None, "GET", "/vms")[0] == 401
    # the scheme is case-insensitive
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
    conn.request("GET", "/v1/vms", headers={"Authorization": f"bearer {carol}"})
    resp = conn.getresponse()
    assert resp.status == 200 and [v["name"] for v in json.loads(resp.read())["vms"]] == [
        "carol1"]
    conn.close()
    agent.ok("DELETE", "/vms/carol1")


def test_the_token_store_never_holds_a_clear_token(world):
    agent = world["agent"]
    token = _token(agent, "vmacc-erin", "operator")
    path = agent.state_dir / "tokens.json"
    text = path.read_text()
    assert token not in text and token.split("_")[-1] not in text
    assert path.stat().st_mode & 0o777 == 0o600
    listed = subprocess.run([sys.executable, "-m", "vmagent.cli", "token", "list", "--json",
                             "--state-dir", str(agent.state_dir)], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    rec = [t for t in json.loads(listed)["tokens"] if t["user"] == "vmacc-erin"][0]
    assert rec["role"] == "operator" and "sha256" not in rec
    assert _tcp(agent, token, "GET", "/vms?all=true")[0] == 200
    subprocess.run([sys.executable, "-m", "vmagent.cli", "token", "revoke", rec["id"],
                    "--state-dir", str(agent.state_dir)], cwd=ROOT, check=True,
                   capture_output=True)
    assert _tcp(agent, token, "GET", "/vms")[0] == 401       # at once, no restart


# --- the SSH transport ------------------------------------------------------------------

def test_an_ssh_tunnelled_caller_is_the_ssh_login_user(world, tmp_path, monkeypatch):
    agent, people = world["agent"], world["people"]
    proc, port, host_pub, sshd_dir = start_sshd({ALICE: people.pub(ALICE)})
    try:
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        kind, key = host_pub.split()[:2]
        (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {kind} {key}\n")
        monkeypatch.setenv("HOME", str(home))
        (home / ".ssh" / "id_ed25519").write_bytes(people.keys[ALICE].read_bytes())
        os.chmod(home / ".ssh" / "id_ed25519", 0o600)
        from vmctl.address import Target, parse_address
        from vmctl.client import AgentClient
        client = AgentClient(Target(parse_address(
            f"ssh://{ALICE}@127.0.0.1:{port}{agent.socket}")))
        try:
            assert client.call("status", name="alice1")["owner"] == ALICE
            assert [v["name"] for v in client.call("list")["vms"]] == ["alice1"]
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(sshd_dir, ignore_errors=True)


# --- the key registry: a URL source -------------------------------------------------------

class _Keys(BaseHTTPRequestHandler):
    served: dict[str, str] = {}

    def do_GET(self):
        user = self.path.strip("/").removesuffix(".keys")
        body = self.served.get(user)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        if body is not None:
            self.wfile.write(body.encode())

    def log_message(self, *a):
        pass


def test_keys_from_a_url_template_cached_and_served_stale(world, tmp_path):
    people = world["people"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Keys)
    _Keys.served = {"vmacc-frank": "# keys of frank\n" + people.pub(BOB) + "\nnot a key\n"}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{{user}}.keys"
    agent = SharedAgent(tmp_path, "--keys-url", url, "--keys-ttl", "0").start()
    try:
        doc = agent.ok("GET", "/keys?user=vmacc-frank")
        assert doc["source"] == "url" and [k["key"] for k in doc["keys"]] == [people.pub(BOB)]
        assert agent.ok("GET", "/keys?user=vmacc-nobody")["keys"] == []     # a 404
        server.shutdown()
        server.server_close()
        # the source is down: frank's cached keys, with a warning; nobody else's
        doc = agent.ok("GET", "/keys?user=vmacc-frank")
        assert [k["key"] for k in doc["keys"]] == [people.pub(BOB)]
        assert "unreachable" in doc["warning"] and "cached" in doc["warning"]
        status, err = agent.call("GET", "/keys?user=vmacc-george")
        assert status == 503 and "unreachable" in err["message"], err
        assert "vmacc-george" in err["message"]
    finally:
        agent.cleanup()


# --- audit --------------------------------------------------------------------------------

def test_changes_and_refusals_are_audited(world):
    agent = world["agent"]
    agent.as_user(BOB, "POST", "/vms/alice1/start")              # refused
    entries = agent.ok("GET", "/host/log?tail=100000")["entries"]
    mine = [e for e in entries if e["user"] == ALICE and e["operation"] == "create"]
    assert mine and mine[0]["result"] == "ok" and mine[0]["transport"] == "unix"
    assert mine[0]["target"] == {"kind": "vm", "name": "alice1"}
    refused = [e for e in entries if e["user"] == BOB and e["operation"] == "start"]
    assert refused and refused[-1]["result"] == "refused"
    assert refused[-1]["error"]["code"] == "forbidden"
    assert not [e for e in entries if e["operation"] in ("status", "list")]   # reads
    assert (agent.state_dir / "audit.log").stat().st_mode & 0o777 == 0o600


# --- what other users may not read ----------------------------------------------------------

def test_the_state_dir_lets_the_group_reach_the_socket_only(world):
    agent = world["agent"]
    sock = agent.socket
    assert sock.stat().st_mode & 0o777 == 0o660
    import grp
    assert sock.stat().st_gid == grp.getgrnam(GROUP).gr_gid
    res = subprocess.run(["ls", str(agent.state_dir / "vms")], user=ALICE,
                         capture_output=True, text=True)
    assert res.returncode != 0
    res = subprocess.run(["cat", str(agent.state_dir / "tokens.json")], user=ALICE,
                         capture_output=True, text=True)
    assert res.returncode != 0


# --- migration ------------------------------------------------------------------------------

def test_a_vm_from_before_ownership_belongs_to_the_operators(world, tmp_path):
    agent = SharedAgent(tmp_path).start()
    try:
        agent.import_test_image()
        agent.ok("POST", "/vms", {"name": "legacy", "image": "test", "start": False,
                                  "ssh_keys": [world["people"].pub(ALICE)]})
        agent.stop()
        state = agent.state_dir / "vms" / "legacy" / "state.json"
        doc = json.loads(state.read_text())
        for key in ("owner", "accounts", "format"):
            doc.pop(key)
        state.write_text(json.dumps(doc))              # as vmagent 0.1 wrote it
        agent.start()
        st = agent.ok("GET", "/vms/legacy")
        assert st["owner"] is None
        assert [v["name"] for v in agent.ok("GET", "/vms")["vms"]] == ["legacy"]
        status, doc = agent.as_user(ALICE, "GET", "/vms/legacy")
        assert status == 403 and "the operators" in doc["message"]
        # only an operator hands it over; then it is alice's, with her account
        agent.as_user(ALICE, "POST", "/keys", {"keys": world["people"].pub(ALICE)})
        status, doc = agent.as_user(ALICE, "POST", "/vms/legacy/config", {"owner": ALICE})
        assert status == 403
        st = agent.ok("POST", "/vms/legacy/config", {"owner": ALICE})
        assert st["owner"] == ALICE and st["accounts"] == [ALICE]
        assert agent.as_user(ALICE, "GET", "/vms/legacy")[0] == 200
    finally:
        agent.cleanup()
