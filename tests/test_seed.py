"""Tests of vmagent.seed: the generated cloud-config, its merge rules and the cidata ISO."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess

import pycdlib
import pytest
import yaml

from vmagent.identity import seed
from vmagent.errors import BadRequest
from vmagent.spec import VMSpec

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa alice@host"
KEY_B = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCbbbbbbbbbbbbbbbbbbbbbbbb bob@host"
KEY_EXTRA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExtraExtraExtraExtraExtraExtraExtraExt ci@x"
MAC = "52:54:00:12:34:56"

CALLER_USER_DATA = """\
packages: [htop, jq]
runcmd:
  - 'echo "hello: world" > /tmp/x'
write_files:
  - path: /etc/motd
    content: |
      Welcome: "quoted" & 'single' # not a comment
      üñíçødé ✓ — line two
users:
  - name: bob
    groups: docker
    ssh_authorized_keys: [%s]
  - name: carol
    shell: /bin/zsh
ssh_pwauth: true
""" % KEY_EXTRA


def make_spec(user_data: str | None = CALLER_USER_DATA) -> VMSpec:
    body = {"name": "web1", "ssh_keys": [KEY_A, KEY_B], "admins": ["alice", "bob"]}
    if user_data is not None:
        body["user_data"] = user_data
    return VMSpec.from_dict(body)


def users_by_name(doc: dict) -> dict:
    return {u["name"] if isinstance(u, dict) else u: u for u in doc["users"]}


def test_meta_data_and_instance_ids():
    assert seed.build_meta_data("web1", "web1-abc") == {
        "instance-id": "web1-abc", "local-hostname": "web1"}
    ids = {seed.new_instance_id("web1") for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith("web1-") for i in ids)


def test_generated_user_data_without_caller_data():
    doc = seed.build_user_data(make_spec(None))
    assert doc["hostname"] == doc["fqdn"] == "web1"
    assert doc["preserve_hostname"] is False
    # password logins off through an sshd drop-in written before sshd starts (cloud-init's
    # ssh_pwauth would restart sshd after it first answered)
    assert "ssh_pwauth" not in doc
    assert doc["write_files"] == [{"path": seed.SSHD_AUTH_CONF, "permissions": "0644",
                                   "content": seed.SSHD_AUTH}]
    assert "PasswordAuthentication no" in seed.SSHD_AUTH.splitlines()
    assert doc["disable_root"] is True
    assert doc["ssh_deletekeys"] is False
    assert "ssh_authorized_keys" not in doc        # keys go to the admins only
    users = users_by_name(doc)
    assert list(users) == ["alice", "bob"]
    for user in users.values():
        assert user["ssh_authorized_keys"] == [KEY_A, KEY_B]
        assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
        assert "sudo" in user["groups"]
        assert user["shell"] == "/bin/bash"
        assert user["lock_passwd"] is True


def test_users_key_present_even_without_admins():
    spec = VMSpec.from_dict({"name": "bare"})
    assert seed.build_user_data(spec)["users"] == []   # an absent key means "default"


def test_merge_rules():
    image = {"packages": ["build-essential", "git"], "runcmd": ["echo image"],
             "apt": {"preserve_sources_list": True}}
    doc = seed.build_user_data(make_spec(), extra=image)
    # lists concatenate: generated/image first, then the caller
    assert doc["packages"] == ["build-essential", "git", "htop", "jq"]
    assert doc["runcmd"] == ["echo image", 'echo "hello: world" > /tmp/x']
    assert doc["apt"] == {"preserve_sources_list": True}
    # scalars: the caller wins (explicitly, even a security setting); choosing
    # ssh_pwauth leaves it to cloud-init, without the generated drop-in
    assert doc["ssh_pwauth"] is True
    assert seed.SSHD_AUTH_CONF not in [f["path"] for f in doc["write_files"]]
    # users: an entry named like an admin merges into it, others are appended
    users = users_by_name(doc)
    assert list(users) == ["alice", "bob", "carol"]
    assert [u["name"] for u in doc["users"]].count("bob") == 1
    bob = users["bob"]
    assert bob["ssh_authorized_keys"] == [KEY_A, KEY_B, KEY_EXTRA]
    assert bob["groups"] == ["adm", "sudo", "docker"]       # "docker" string -> list
    assert bob["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert users["alice"]["ssh_authorized_keys"] == [KEY_A, KEY_B]
    assert users["carol"] == {"name": "carol", "shell": "/bin/zsh"}
    # the image layer is not mutated
    assert image["packages"] == ["build-essential", "git"]


def test_user_merge_dedups_keys_and_caller_overrides_user_scalars():
    ud = yaml.safe_dump({"users": [{"name": "alice", "ssh_authorized_keys": [KEY_A],
                                    "shell": "/bin/zsh", "groups": "adm, wheel"}]})
    alice = users_by_name(seed.build_user_data(make_spec(ud)))["alice"]
    assert alice["ssh_authorized_keys"] == [KEY_A, KEY_B]
    assert alice["groups"] == ["adm", "sudo", "wheel"]
    assert alice["shell"] == "/bin/zsh"


def test_bare_admin_name_in_users_is_not_duplicated():
    doc = seed.build_user_data(make_spec("users: [alice, dave]\n"))
    assert [u if isinstance(u, str) else u["name"] for u in doc["users"]] == [
        "alice", "bob", "dave"]


@pytest.mark.parametrize("users", ["[default]", "[default, {name: x}]",
                                   "[{name: default}]", "default",
                                   "['bob, default']"])
def test_default_user_is_refused(users):
    with pytest.raises(BadRequest, match="default"):
        seed.build_user_data(make_spec(f"users: {users}\n"))


def test_odd_users_entries_are_passed_through():
    doc = seed.build_user_data(make_spec("users: [[x], {name: [y]}, {groups: z}]\n"))
    assert doc["users"][2:] == [["x"], {"name": ["y"]}, {"groups": "z"}]


def test_legacy_users_mapping_merges_by_name():
    doc = seed.build_user_data(make_spec("users: {alice: {shell: /bin/sh}, erin: {}}\n"))
    users = users_by_name(doc)
    assert users["alice"]["shell"] == "/bin/sh" and users["erin"] == {"name": "erin"}


def test_no_default_user_in_rendered_seed():
    files = seed.render_seed(make_spec(), "web1-1", MAC)
    doc = yaml.safe_load(files["user-data"])
    assert "default" not in doc["users"]
    assert all(isinstance(u, dict) and u["name"] != "default" for u in doc["users"])


def test_bad_extra_and_oversize():
    with pytest.raises(BadRequest):
        seed.build_user_data(make_spec(None), extra=["not", "a", "dict"])  # type: ignore[arg-type]
    big = {"write_files": [{"path": f"/f{i}", "content": "x" * 60000} for i in range(5)]}
    with pytest.raises(BadRequest, match="256 KiB"):
        seed.build_user_data(make_spec(None), extra=big)
    with pytest.raises(BadRequest):
        seed.render_user_data("nope")  # type: ignore[arg-type]


def test_special_characters_round_trip():
    tricky = {
        "write_files": [{"path": "/etc/x: y", "content": 'a: "b"\n\'c\' #d\n- e\n{f}\n'}],
        "runcmd": [["sh", "-c", "echo 'x: y' && echo \"z\""], "yes", "no", "on", "012",
                   "1:2:3", "null", "~", "* star", "&anchor", "! tag", "%pct", "@at",
                   "line1\nline2\n", "  leading space", "trailing space  ", "tab\there",
                   "üñíçødé ✓ 日本語 🚀"],
        "bootcmd": [True, 12, 1.5, None],
    }
    spec = make_spec(yaml.safe_dump(tricky, allow_unicode=True))
    files = seed.render_seed(spec, "web1-1", MAC)
    doc = yaml.safe_load(files["user-data"].decode("utf-8"))
    assert doc["write_files"][1:] == tricky["write_files"]     # after the generated one
    assert doc["runcmd"] == tricky["runcmd"]
    assert doc["bootcmd"] == tricky["bootcmd"]
    # and the caller's own document from make_spec() survives too
    motd = yaml.safe_load(CALLER_USER_DATA)["write_files"][0]
    doc2 = yaml.safe_load(seed.render_seed(make_spec(), "i", MAC)["user-data"])
    assert doc2["write_files"] == [motd]
    assert doc2["runcmd"] == ['echo "hello: world" > /tmp/x']


def test_network_config():
    net = seed.build_network_config(MAC.upper())
    assert net == {"version": 2, "ethernets": {"eth0": {
        "match": {"macaddress": MAC}, "set-name": "eth0", "dhcp4": True}}}
    rendered = yaml.safe_load(seed.render_seed(make_spec(), "i", MAC)["network-config"])
    assert rendered == net
    for bad in ("52:54:00:12:34", "zz:54:00:12:34:56", "", None, "52-54-00-12-34-56"):
        with pytest.raises(BadRequest):
            seed.build_network_config(bad)  # type: ignore[arg-type]


def test_render_seed_files():
    files = seed.render_seed(make_spec(), "web1-0123456789ab", MAC)
    assert set(files) == {"meta-data", "user-data", "network-config"}
    assert all(isinstance(v, bytes) for v in files.values())
    assert yaml.safe_load(files["meta-data"]) == {
        "instance-id": "web1-0123456789ab", "local-hostname": "web1"}
    assert files["user-data"].startswith(b"#cloud-config\n")
    assert b"&id" not in files["user-data"] and b"*id" not in files["user-data"]
    doc = yaml.safe_load(files["user-data"])
    assert doc == seed.build_user_data(make_spec())


def _open_iso(data: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    return iso


def test_iso_layout_and_round_trip(tmp_path):
    files = seed.render_seed(make_spec(), "web1-1", MAC)
    path = tmp_path / "seed.iso"
    seed.write_seed_iso(path, files)
    data = path.read_bytes()
    iso = _open_iso(data)
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        rr = {c.rock_ridge.name().decode() for c in iso.list_children(rr_path="/")
              if c.is_file()}
        joliet = {c.file_identifier().decode("utf-16_be")
                  for c in iso.list_children(joliet_path="/") if c.is_file()}
        plain = {c.file_identifier().decode() for c in iso.list_children(iso_path="/")
                 if c.is_file()}
        for name, content in files.items():
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, joliet_path=f"/{name}")
            assert buf.getvalue() == content
    finally:
        iso.close()
    assert rr == joliet == {"meta-data", "user-data", "network-config"}
    assert plain == {"METADATA.;1", "USERDATA.;1", "NETWORKC.;1"}
    assert seed.read_seed_iso(path) == files
    assert seed.read_seed_iso(data) == files
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_iso_rewrite_replaces_file(tmp_path):
    path = tmp_path / "seed.iso"
    seed.write_seed_iso(path, {"meta-data": b"a: 1\n"})
    seed.write_seed_iso(path, {"meta-data": b"a: 2\n"})
    assert seed.read_seed_iso(path) == {"meta-data": b"a: 2\n"}
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]   # no temp files left


def test_iso_name_collisions_and_bad_names():
    files = {"user-data": b"1", "userdata": b"2", "user_data": b"3"}
    assert seed.read_seed_iso(seed.iso_bytes(files)) == files
    for bad in ("", "a/b", "x" * 65):
        with pytest.raises(BadRequest):
            seed.iso_bytes({bad: b""})


@pytest.mark.skipif(shutil.which("isoinfo") is None,
                    reason="isoinfo (genisoimage package) is not installed")
def test_isoinfo_sees_cidata(tmp_path):
    path = tmp_path / "seed.iso"
    seed.write_seed_iso(path, seed.render_seed(make_spec(), "web1-1", MAC))
    out = subprocess.run(["isoinfo", "-d", "-i", str(path)], check=True,
                         capture_output=True, text=True).stdout
    assert "Volume id: cidata" in out.splitlines()
    listing = subprocess.run(["isoinfo", "-J", "-f", "-i", str(path)], check=True,
                             capture_output=True, text=True).stdout.split()
    assert sorted(listing) == ["/meta-data", "/network-config", "/user-data"]


@pytest.mark.skipif(importlib.util.find_spec("cloudinit") is None,
                    reason="cloud-init is not installed on this machine")
def test_cloud_init_schema():  # pragma: no cover - depends on cloud-init
    from cloudinit.config.schema import get_schema, validate_cloudconfig_schema
    doc = seed.build_user_data(make_spec(), extra={"packages": ["git"]})
    validate_cloudconfig_schema(doc, get_schema(), strict=True)


def test_host_keys_the_agent_made_go_into_the_seed_before_the_callers_files(tmp_path):
    from vmagent.identity import hostkeys
    spec = make_spec()
    keys = hostkeys.for_vm(spec.name, None, spec.extra_cloud_config())
    assert keys is not None and set(keys) == {"ed25519", "ecdsa"}
    doc = yaml.safe_load(seed.render_seed(spec, "web1-1", MAC, None, keys)["user-data"])
    assert doc["ssh_keys"] == {"ed25519_private": keys["ed25519"][0],
                               "ed25519_public": keys["ed25519"][1],
                               "ecdsa_private": keys["ecdsa"][0],
                               "ecdsa_public": keys["ecdsa"][1]}
    assert doc["ssh"] == {"emit_keys_to_console": False}
    # sshd offers only these types; the caller's write_files follow the generated one
    assert [f["path"] for f in doc["write_files"]] == [
        hostkeys.SSHD_CONF, "/etc/ssh/ssh_host_ed25519_key.pub",
        "/etc/ssh/ssh_host_ecdsa_key.pub", "/etc/motd"]     # (ssh_pwauth: no drop-in)
    # the public halves readable by all once cloud-init wrote them (it makes them 0600)
    pub = doc["write_files"][1]
    assert pub == {"path": "/etc/ssh/ssh_host_ed25519_key.pub", "permissions": "0644",
                   "content": keys["ed25519"][1] + "\n", "defer": True}
    assert doc["write_files"][0]["content"].splitlines()[1:] == [
        "HostKey /etc/ssh/ssh_host_ed25519_key", "HostKey /etc/ssh/ssh_host_ecdsa_key"]
    # without keys: nothing about host keys (cloud-init makes its own, prints them)
    plain = seed.build_user_data(spec)
    assert not {"ssh_keys", "ssh"} & set(plain)
    assert [f["path"] for f in plain["write_files"]] == ["/etc/motd"]
    # kept in the run dir, private to root
    hostkeys.save(tmp_path, keys)
    assert hostkeys.load(tmp_path) == keys
    assert (tmp_path / hostkeys.FILE).stat().st_mode & 0o777 == 0o600
    assert hostkeys.load(tmp_path / "nowhere") is None


@pytest.mark.parametrize("layer", [{"ssh_keys": {"rsa_private": "x", "rsa_public": "y"}},
                                   {"ssh_genkeytypes": ["rsa"]}])
def test_a_callers_own_host_key_config_wins(layer):
    from vmagent.identity import hostkeys
    spec = VMSpec.from_dict({"name": "web1", "user_data": yaml.safe_dump(layer)})
    assert hostkeys.for_vm("web1", None, spec.extra_cloud_config()) is None
    assert hostkeys.for_vm("web1", layer, {}) is None           # the image's
    assert hostkeys.for_vm("web1", {"packages": ["jq"]}, {}) is not None
