"""Users and access inside a real guest (a warm clone of the session template): an admin
added by push_config logs in with their own key under their own name at once, and is
refused once removed; a clone made for another person carries none of the template
creator's keys."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys

import pytest

from agent_helpers import ROOT, keypair, ssh, ssh_retry

pytestmark = pytest.mark.integration


def _who(port: int, key, user: str, cmd: str = "id -un") -> subprocess.CompletedProcess:
    return ssh(port, key, cmd, user=user, timeout=120)


def test_an_admin_added_and_removed_in_the_running_guest(session_agent, warm_vm, tmp_path):
    a = session_agent
    key = keypair(tmp_path, "ginny")
    a.ok("POST", "/keys", {"user": "ginny", "keys": key.with_suffix(".pub").read_text()})
    st = warm_vm()
    port, name = st["ssh_port"], st["name"]
    assert ssh_retry(port, a.key, "id -un", user="dev").stdout.strip() == "dev"
    assert _who(port, key, "ginny").returncode == 255          # no account yet
    doc = a.ok("POST", f"/vms/{name}/config", {"admins": ["ginny"]})
    assert doc["accounts_synced"] == {"added": ["ginny"], "removed": [], "ok": True}, doc
    res = _who(port, key, "ginny", "id -un; sudo -n true && echo sudo-ok")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ginny", "sudo-ok"]
    assert _who(port, a.key, "ginny").returncode == 255        # only her own key
    doc = a.ok("POST", f"/vms/{name}/config", {"admins": []})
    assert doc["accounts_synced"]["removed"] == ["ginny"] and doc["accounts_synced"]["ok"]
    assert _who(port, key, "ginny").returncode == 255
    res = _who(port, a.key, "dev", "getent passwd ginny || echo gone")
    assert res.stdout.strip() == "gone"


def test_a_clone_for_another_person_has_none_of_the_creators_keys(session_agent,
                                                                  session_template,
                                                                  tmp_path):
    a = session_agent
    token = subprocess.run([sys.executable, "-m", "vmagent.cli", "token", "add", "nina",
                            "--state-dir", str(a.state_dir)], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.strip()
    key = keypair(tmp_path, "nina")

    def tcp(method: str, path: str, body=None) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=600)
        conn.request(method, "/v1" + path, body=json.dumps(body) if body else None,
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read() or b"{}")
        conn.close()
        assert resp.status < 300, doc
        return doc

    tcp("POST", "/keys", {"keys": key.with_suffix(".pub").read_text()})
    st = tcp("POST", "/vms", {"name": "nina1", "template": session_template})
    try:
        assert st["owner"] == "nina" and st["accounts"] == ["nina"]
        port = st["ssh_port"]
        assert ssh_retry(port, key, "id -un", user="nina").stdout.strip() == "nina"
        # the template's creator (root, account dev, the session key) gets in nowhere
        assert _who(port, a.key, "dev").returncode == 255
        assert _who(port, a.key, "nina").returncode == 255
    finally:
        tcp("DELETE", "/vms/nina1")
