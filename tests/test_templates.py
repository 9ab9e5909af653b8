"""Templates and warm starts.

The unit tests (no qemu) check the template store, its state-file verification, the
re-identification script and the operation table. The integration tests (a real guest
under TCG, in order: they share one template) create a template from the test image,
warm-start two clones, and check that they are different machines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent_helpers import AgentProcess, keypair, require_test_image, ssh_retry
from vmagent import ops
from vmagent.errors import ImageError, NotFound
from vmagent.identity.hostkeys import generate as host_keys
from vmagent.identity.accounts import Account
from vmagent.identity.reidentify import console_key_block, reidentify_argv, reidentify_files
from vmagent.rundir import SAVED_STATE as STATE_FILE, TEMPLATE_RECORD as TEMPLATE_FILE
from vmagent.templates.store import Template, TemplateStore

# --- unit -------------------------------------------------------------------------------


def _store_with(tmp_path: Path, data: bytes = b"state" * 1000) -> tuple[TemplateStore, Template]:
    store = TemplateStore(tmp_path / "templates")
    d = store.dir("t1")
    d.mkdir()
    (d / STATE_FILE).write_bytes(data)
    tpl = Template(name="t1", image="test", cpus=2, memory=1 << 30, disk=4 << 30,
                   mac="52:54:00:00:00:01", vmgenid="x", hostname="t1",
                   state_size=len(data), state_sha256=hashlib.sha256(data).hexdigest())
    store.save(tpl, d)
    return store, store.get("t1")


def test_store_lists_and_reads_templates(tmp_path):
    store, tpl = _store_with(tmp_path)
    assert store.names() == ["t1"] and tpl.path == store.dir("t1")
    assert json.loads((tpl.path / TEMPLATE_FILE).read_text())["state_size"] == 5000
    with pytest.raises(NotFound, match="no template named 'nope'"):
        store.get("nope")


def test_verify_accepts_the_saved_file_and_refuses_a_changed_one(tmp_path):
    store, tpl = _store_with(tmp_path)
    asyncio.run(store.verify(tpl))
    asyncio.run(store.verify(tpl))              # cached for this version of the file
    data = bytearray(tpl.state_path.read_bytes())
    data[100] ^= 0xFF                           # same size, other content
    tpl.state_path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="is corrupt: sha256"):
        asyncio.run(store.verify(tpl))
    tpl.state_path.write_bytes(b"short")
    with pytest.raises(ImageError, match="is corrupt: 5 bytes, 5000 were saved"):
        asyncio.run(store.verify(tpl))
    tpl.state_path.unlink()
    with pytest.raises(ImageError, match="is missing"):
        asyncio.run(store.verify(tpl))


def test_remove_keeps_the_disk_while_clones_use_it(tmp_path):
    store, tpl = _store_with(tmp_path)
    (tpl.path / "disk.qcow2").write_bytes(b"disk")
    store.remove("t1", keep_disk=True)
    assert store.names() == [] and store.orphans() == ["t1"]
    assert [p.name for p in tpl.path.iterdir()] == ["disk.qcow2"]
    store.remove("t1", keep_disk=False)
    assert not tpl.path.exists()


def _guest_root(tmp_path: Path) -> Path:
    """A directory laid out like the template guest's files that the program touches."""
    root = tmp_path / "guest"
    for d in ("etc/ssh/sshd_config.d", "etc/sudoers.d", "root/.ssh", "home/nobody/.ssh",
              "home/olduser/.ssh", "proc/sys/kernel", "var/lib/dbus"):
        (root / d).mkdir(parents=True)
    (root / "etc/ssh/ssh_host_rsa_key").write_text("template's key")
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text("template's key")
    (root / "root/.ssh/authorized_keys").write_text("ssh-ed25519 AAAA creator\n")
    (root / "home/olduser/.ssh/authorized_keys").write_text("ssh-ed25519 AAAA creator\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 tpl1 tpl1\n")
    (root / "etc/machine-id").write_text("template\n")
    (root / "var/lib/dbus/machine-id").write_text("template\n")
    (root / "proc/sys/kernel/hostname").write_text("tpl1\n")
    return root


def test_reidentify_program_gives_the_clone_its_identity_and_only_its_keys(tmp_path):
    keys = host_keys("root@c1")
    assert set(keys) == {"ed25519", "ecdsa"}
    # "nobody" exists on the host running the test; in a guest it is a person's account
    accounts = [Account("nobody", ["nobody"], ["ssh-ed25519 AAAA owner@x"])]
    root = _guest_root(tmp_path)
    args = reidentify_argv("c1", accounts, keys, "ab" * 16, 1764000000.5, b"r" * 64,
                           ["nobody"], root=str(root))
    res = subprocess.run(["perl", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reidentified" in res.stdout and "T " in res.stdout
    assert (root / "proc/sys/kernel/hostname").read_text() == "c1\n"
    assert (root / "etc/hostname").read_text() == "c1\n"
    assert (root / "etc/hosts").read_text() == "127.0.0.1 localhost\n127.0.1.1 c1 c1\n"
    assert (root / "etc/machine-id").read_text() == "ab" * 16 + "\n"
    assert (root / "var/lib/dbus/machine-id").read_text() == "ab" * 16 + "\n"
    # the template's host keys are gone, the clone's are in place with their modes
    assert sorted(p.name for p in (root / "etc/ssh").glob("ssh_host_*")) == [
        "ssh_host_ecdsa_key", "ssh_host_ecdsa_key.pub", "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub"]
    priv = root / "etc/ssh/ssh_host_ed25519_key"
    assert priv.read_text() == keys["ed25519"][0] and priv.stat().st_mode & 0o777 == 0o600
    assert "HostKey /etc/ssh/ssh_host_ed25519_key" in \
        (root / "etc/ssh/sshd_config.d/05-vmagent-hostkeys.conf").read_text()
    # only this VM's keys grant access: the creator's are emptied everywhere
    ak = root / "home/nobody/.ssh/authorized_keys"
    assert ak.read_text() == "ssh-ed25519 AAAA owner@x\n"
    assert ak.stat().st_mode & 0o777 == 0o600 and ak.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert (root / "home/nobody/.ssh").stat().st_mode & 0o777 == 0o700
    assert (root / "root/.ssh/authorized_keys").read_text() == ""
    assert (root / "home/olduser/.ssh/authorized_keys").read_text() == ""
    assert (root / "etc/sudoers.d/90-vmagent-nobody").stat().st_mode & 0o777 == 0o440
    assert not list(root.rglob("*.vmagent-new"))
    files = reidentify_files("c1", accounts, keys, "ab" * 16)
    assert list(files).index("/home/nobody/.ssh") < \
        list(files).index("/home/nobody/.ssh/authorized_keys")
    block = console_key_block(keys).decode()
    assert "-----BEGIN SSH HOST KEY KEYS-----" in block and "ssh-ed25519 " in block


def test_host_keys_are_valid_openssh_keys(tmp_path):
    keys = host_keys("root@c1")
    for kind, (private, public) in keys.items():
        path = tmp_path / kind
        path.write_text(private)
        path.chmod(0o600)
        derived = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], check=True,
                                 capture_output=True, text=True).stdout.split()[:2]
        assert derived == public.split()[:2] and public.endswith(" root@c1")
    assert keys["ed25519"][1].startswith("ssh-ed25519 ")
    assert keys["ecdsa"][1].startswith("ecdsa-sha2-nistp256 ")
    assert host_keys("x")["ed25519"][1] != keys["ed25519"][1]


def test_reidentify_program_creates_missing_admins_and_sets_the_clock():
    accounts = [Account("dev", ["root"], ["ssh-ed25519 AAAA root@x"]),
                Account("alice", ["alice"], ["ssh-ed25519 BBBB alice@x"])]
    args = reidentify_argv("c1", accounts, host_keys("x"), "ab" * 16, 1764000000.5,
                           b"r" * 2, ["dev"])
    i = args.index("--")
    assert args[i + 1:i + 8] == ["/", "c1", "1764000000", "500000", "7272",
                                 "adm,sudo", "alice"]
    # each account gets exactly its own person's keys
    files = reidentify_files("c1", accounts, host_keys("x"), "ab" * 16)
    assert files["/home/alice/.ssh/authorized_keys"][0] == b"ssh-ed25519 BBBB alice@x\n"
    assert files["/home/dev/.ssh/authorized_keys"][0] == b"ssh-ed25519 AAAA root@x\n"
    # the program is valid perl
    subprocess.run(["perl", "-c", "-e", args[1]], check=True, capture_output=True)


def test_operations_are_in_the_table():
    assert "template" in ops.get("create").params
    assert ops.get("template_create").path == "/templates"
    assert ops.get("template_remove").path_params == ("template",)
    assert ops.get("template_show").render_path({"template": "t1"}) == "/v1/templates/t1"


# --- integration ------------------------------------------------------------------------

TPL = "tpl1"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_test_image()
    base = tmp_path_factory.mktemp("tpl")
    agent = AgentProcess(base / "state").start()
    agent.import_test_image()
    key = keypair(base)
    state = {"agent": agent, "key": key, "base": base,
             "pub": key.with_suffix(".pub").read_text().strip()}
    yield state
    state["agent"].cleanup()


def _login(env, name: str, *cmd: str) -> subprocess.CompletedProcess:
    st = env["agent"].wait_ready(name)
    return ssh_retry(st["ssh_port"], env["key"], *cmd)


@pytest.mark.integration
def test_template_create(env):
    agent = env["agent"]
    doc = agent.ok("POST", "/templates", {"template": TPL, "image": "test", "cpus": 2,
                                          "memory": "1G", "disk": "4G"}, timeout=1800)
    assert doc["name"] == TPL and doc["state_size"] > 0 and len(doc["state_sha256"]) == 64
    tdir = agent.state_dir / "templates" / TPL
    assert (tdir / "disk.qcow2").stat().st_mode & 0o777 == 0o444
    assert (tdir / "vmstate.bin").stat().st_size == doc["state_size"]
    assert [t["name"] for t in agent.ok("GET", "/templates")["templates"]] == [TPL]
    assert agent.ok("GET", "/vms") == {"vms": []}      # the template VM is private
    print(f"template built in {doc['build_seconds']}s, state "
          f"{doc['state_size'] >> 20} MiB saved in {doc['save_seconds']}s")


@pytest.mark.integration
def test_clone_resources_are_the_templates(env):
    status, err = env["agent"].call("POST", "/vms", {"name": "bad", "template": TPL,
                                                     "memory": "2G"})
    assert status == 400 and "template's memory (1G)" in err["message"]
    assert env["agent"].call("GET", "/vms/bad")[0] == 404


@pytest.mark.integration
def test_two_warm_clones_are_different_machines(env):
    agent = env["agent"]
    docs = {}
    for name in ("c1", "c2"):
        t0 = time.monotonic()
        docs[name] = agent.ok("POST", "/vms", {"name": name, "template": TPL,
                                               "ssh_keys": [env["pub"]]})
        assert docs[name]["state"] == "running" and docs[name]["ssh_ready"]
        res = _login(env, name, "true")
        assert res.returncode == 0, res.stderr
        print(f"{name}: warm create -> SSH login {time.monotonic() - t0:.2f}s "
              f"{docs[name]['warm']}")
    ident = {}
    for name in ("c1", "c2"):
        res = _login(env, name, "hostname; cat /etc/machine-id; "
                     "cat /etc/ssh/ssh_host_ed25519_key.pub; date +%s")
        assert res.returncode == 0, res.stderr
        host, mid, hostkey, epoch = res.stdout.splitlines()[:4]
        assert host == name
        assert abs(int(epoch) - time.time()) < 30        # the clock was set
        assert hostkey.split()[1] in " ".join(docs[name]["host_keys"])
        ident[name] = (mid, hostkey.split()[1])
    assert ident["c1"][0] != ident["c2"][0]              # machine-id
    assert ident["c1"][1] != ident["c2"][1]              # SSH host key
    # the template's key is gone: only this VM's key is authorized
    res = _login(env, "c1", "sudo -n cat /home/dev/.ssh/authorized_keys")
    assert res.stdout.strip() == env["pub"]
    # separate disks
    assert _login(env, "c1", "echo only-c1 > ~/mark; sync").returncode == 0
    assert _login(env, "c2", "cat ~/mark").returncode != 0


@pytest.mark.integration
def test_corrupt_state_file_is_refused(env):
    agent = env["agent"]
    state = agent.state_dir / "templates" / TPL / "vmstate.bin"
    original = state.read_bytes()[4096:4100]
    state.chmod(0o644)
    with open(state, "r+b") as f:
        f.seek(4096)
        f.write(bytes(b ^ 0xFF for b in original))
    try:
        status, err = agent.call("POST", "/vms", {"name": "c3", "template": TPL,
                                                  "ssh_keys": [env["pub"]]})
        assert status == 400 and "is corrupt" in err["message"], err
        assert agent.call("GET", "/vms/c3")[0] == 404
        assert not (agent.state_dir / "vms" / "c3").exists()
    finally:
        with open(state, "r+b") as f:
            f.seek(4096)
            f.write(original)
        state.chmod(0o444)


@pytest.mark.integration
def test_remove_is_refused_while_clones_use_it(env):
    status, err = env["agent"].call("DELETE", f"/templates/{TPL}")
    assert status == 409 and "c1" in err["message"]


@pytest.mark.integration
def test_reboot_keeps_the_clones_identity(env):
    agent = env["agent"]
    before = _login(env, "c1", "hostname; cat /etc/machine-id; "
                    "cat /etc/ssh/ssh_host_ed25519_key.pub; "
                    "cat /proc/sys/kernel/random/boot_id").stdout.split("\n")
    doc = agent.ok("POST", "/vms/c1/reboot", {"timeout": 60})
    # the clone's guest agent answers (re-identification used it): it reboots the guest
    assert doc["method"] == "guest-agent", doc
    deadline = time.monotonic() + 600
    while agent.ok("GET", "/vms/c1")["cloud_init"] != "done":   # the clone's seed applied
        assert time.monotonic() < deadline
        time.sleep(2)
    after = _login(env, "c1", "hostname; cat /etc/machine-id; "
                   "cat /etc/ssh/ssh_host_ed25519_key.pub; "
                   "cat /proc/sys/kernel/random/boot_id").stdout.split("\n")
    assert after[3] != before[3]                         # it did reboot
    assert after[:3] == before[:3]                       # name, machine-id, host key kept
    res = _login(env, "c1", "cat ~/mark")
    assert res.stdout.strip() == "only-c1"


@pytest.mark.integration
def test_agent_restart_readopts_a_warm_vm(env):
    agent = env["agent"]
    before = agent.ok("GET", "/vms/c2")
    agent.stop(signal.SIGKILL)
    agent = env["agent"] = AgentProcess(agent.state_dir).start()
    after = agent.ok("GET", "/vms/c2")
    assert after["state"] == "running" and after["pid"] == before["pid"]
    assert _login(env, "c2", "hostname").stdout.strip() == "c2"
    assert [t["vms"] for t in agent.ok("GET", "/templates")["templates"]] == [["c1", "c2"]]


@pytest.mark.integration
def test_delete_clones_then_remove_template(env):
    agent = env["agent"]
    for name in ("c1", "c2"):
        agent.ok("DELETE", f"/vms/{name}")
    assert agent.ok("DELETE", f"/templates/{TPL}")["deleted"] == TPL
    assert not (agent.state_dir / "templates" / TPL).exists()
