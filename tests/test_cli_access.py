"""vmctl's side of users and access against a real agent: key add/list/rm, list --all,
push-config --admin/--no-admins/--owner, host log, and 403 as exit code 8 (the agent's
checks themselves are tested in test_access.py with real users)."""

from __future__ import annotations

import json

from cli_helpers import GOLDEN_KEY, agent, ensure_test_image, home, local, run  # noqa: F401


def _pub(home, name="k1"):
    path = home / f"{name}.pub"
    path.write_text(GOLDEN_KEY.replace("golden@vmctl", f"{name}@vmctl") + "\n")
    return path


def test_key_add_list_rm(local, home):
    added = local("--json", "key", "add", _pub(home), "--user", "cliuser")
    assert added.exit_code == 0, added.stderr
    fp = json.loads(added.stdout)["added"][0]["fingerprint"]
    listed = json.loads(local("key", "list", "--json", "-u", "cliuser").stdout)
    assert [k["fingerprint"] for k in listed["keys"]] == [fp]
    assert listed["source"] == "keys-dir"
    assert "k1@vmctl" in local("key", "list", "--user", "cliuser").stdout
    assert local("key", "rm", fp, "--user", "cliuser").exit_code == 0
    assert "has no SSH keys" in local("key", "list", "--user", "cliuser").stdout
    gone = local("key", "rm", fp, "--user", "cliuser")
    assert gone.exit_code == 3 and "no key" in gone.stderr
    bad = home / "bad.pub"
    bad.write_text("not a key\n")
    refused = local("key", "add", bad)
    assert refused.exit_code == 2 and "not an OpenSSH public key" in refused.stderr


def test_owner_admins_and_the_audit_log(local, home):
    ensure_test_image(local)
    local("key", "add", _pub(home, "bob"), "--user", "bob")
    created = local("--json", "create", "acc1", "--image", "test", "--no-start",
                    "--ssh-key", _pub(home))
    assert created.exit_code == 0, created.stderr
    st = json.loads(created.stdout)
    assert st["owner"] == "root" and st["accounts"] == ["dev"]
    try:
        doc = json.loads(local("push-config", "acc1", "--admin", "bob", "--json").stdout)
        assert doc["accounts"] == ["dev", "bob"] and doc["spec"]["admins"] == ["bob"]
        doc = json.loads(local("push-config", "acc1", "--no-admins", "--json").stdout)
        assert doc["accounts"] == ["dev"]
        both = local("push-config", "acc1", "--no-admins", "--admin", "bob")
        assert both.exit_code == 2
        doc = json.loads(local("push-config", "acc1", "--owner", "bob", "--json").stdout)
        assert doc["owner"] == "bob" and doc["accounts"] == ["bob"]
        # an operator's own list no longer has it; --all does
        assert "acc1" not in local("-q", "list").stdout.split()
        assert "acc1" in local("list", "--all", "-q").stdout.split()
        log = local("host", "log", "--json", "--tail", "200")
        entries = json.loads(log.stdout)["entries"]
        ops = [(e["operation"], e["target"]["name"]) for e in entries]
        assert ("create", "acc1") in ops and ("push_config", "acc1") in ops
        assert "push_config" in local("host", "log", "-n", "5").stdout
    finally:
        local("delete", "acc1", "--yes")
