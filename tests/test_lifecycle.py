"""A real guest under TCG, driven through the agent's HTTP API.

One VM is booted for the whole module and walked through its life in order (the tests
depend on each other's order, as the boots are what costs time): login, snapshot,
reboot, shutdown/start, agent SIGKILL and re-adoption, push_config, delete.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from agent_helpers import (AgentProcess, keypair, process_running, require_test_image,
                           ssh_retry)

pytestmark = pytest.mark.integration

NAME = "life1"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_test_image()
    base = tmp_path_factory.mktemp("life")
    agent = AgentProcess(base / "state").start()
    agent.import_test_image()
    key = keypair(base)
    user_data = "write_files:\n  - path: /etc/vmctl-test\n    content: from-user-data\n"
    st = agent.ok("POST", "/vms", {"name": NAME, "image": "test", "memory": "1G",
                                   "cpus": 2, "disk": "4G",
                                   "ssh_keys": [key.with_suffix(".pub").read_text()],
                                   "user_data": user_data})
    state = {"agent": agent, "key": key, "base": base, "created": st,
             "t0": time.monotonic()}
    yield state
    state["agent"].cleanup()


def login(env, *cmd: str) -> subprocess.CompletedProcess:
    st = env["agent"].wait_ready(NAME)
    return ssh_retry(st["ssh_port"], env["key"], *cmd)


def test_created_running_with_reported_fields(env):
    st = env["created"]
    assert st["state"] == "running"
    assert st["accel"] == "tcg"
    assert isinstance(st["pid"], int) and st["pid"] > 1
    assert 20000 <= st["ssh_port"] < 30000
    run = env["agent"].state_dir / "vms" / NAME
    for f in ("argv.json", "spec.json", "state.json", "disk.qcow2", "seed.iso",
              "qemu.pid", "qmp.sock", "console.sock", "qga.sock", "vnc.sock"):
        assert (run / f).exists(), f


def test_ssh_login_runs_command_with_injected_key(env):
    res = login(env, "sudo -n cat /etc/vmctl-test; echo; hostname")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["from-user-data", NAME]
    print(f"boot to SSH through the agent: {time.monotonic() - env['t0']:.1f}s")


def test_cloud_init_reported_done(env):
    deadline = time.monotonic() + 120
    while (st := env["agent"].ok("GET", f"/vms/{NAME}"))["cloud_init"] != "done":
        assert time.monotonic() < deadline, st
        time.sleep(1)
    assert st["boot"]["kernel"] is True


def test_cloud_init_accepts_the_agents_user_data(env):
    """The guest's own cloud-init validates the user-data the agent rendered (the
    host-side schema test in test_seed.py needs cloud-init on the host)."""
    res = login(env, "sudo -n cloud-init schema --system")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Valid cloud-config" in res.stdout, res.stdout
    assert "Error" not in res.stdout + res.stderr


def test_sshd_offers_the_host_keys_the_agent_made_and_reported(env):
    st = env["agent"].ok("GET", f"/vms/{NAME}")
    reported = {" ".join(k.split()[:2]) for k in st["ssh_host_keys"]}
    assert {k.split()[0] for k in reported} == {"ssh-ed25519", "ecdsa-sha2-nistp256"}
    offered, out = set(), ""
    for kind in ("ed25519", "ecdsa", "rsa"):     # one type per scan: fewer parallel
        scan = subprocess.run(["ssh-keyscan", "-T", "30", "-t", kind, "-p",  # handshakes
                               str(st["ssh_port"]), "127.0.0.1"],
                              capture_output=True, text=True, timeout=120)
        out += scan.stdout + scan.stderr
        offered |= {" ".join(line.split()[1:3]) for line in scan.stdout.splitlines()
                    if line and not line.startswith("#")}
    assert offered == reported, out                             # and no RSA key
    res = login(env, "stat -c '%a %n' /etc/ssh/ssh_host_*; "
                "cat /etc/ssh/ssh_host_ed25519_key.pub")
    assert res.returncode == 0, res.stderr
    modes = dict(reversed(line.split(" ", 1)) for line in res.stdout.splitlines()
                 if line.startswith(("6", "4", "7")))
    assert modes == {"/etc/ssh/ssh_host_ed25519_key": "600",
                     "/etc/ssh/ssh_host_ed25519_key.pub": "644",
                     "/etc/ssh/ssh_host_ecdsa_key": "600",
                     "/etc/ssh/ssh_host_ecdsa_key.pub": "644"}, res.stdout
    assert res.stdout.splitlines()[-1] in st["ssh_host_keys"]


def test_snapshot_while_running(env):
    agent = env["agent"]
    doc = agent.ok("POST", f"/vms/{NAME}/snapshots", {"snapshot": "before-reboot"})
    assert doc["snapshot"]["name"] == "before-reboot"
    assert doc["snapshot"]["vm_state_size"] > 0          # RAM was saved: a live snapshot
    assert doc["state"] == "running"
    names = [s["name"] for s in agent.ok("GET", f"/vms/{NAME}/snapshots")["snapshots"]]
    assert names == ["before-reboot"]
    status, err = agent.call("POST", f"/vms/{NAME}/snapshots", {"snapshot": "before-reboot"})
    assert status == 409 and err["error"] == "conflict"
    assert login(env, "true").returncode == 0             # the guest kept running


def test_reboot_and_login_again(env):
    agent = env["agent"]
    boot_id = login(env, "cat /proc/sys/kernel/random/boot_id").stdout.strip()
    doc = agent.ok("POST", f"/vms/{NAME}/reboot", {"timeout": 60})
    assert doc["method"] in ("guest-agent", "acpi")
    res = login(env, "cat /proc/sys/kernel/random/boot_id")
    assert res.returncode == 0 and res.stdout.strip() != boot_id


def test_shutdown_then_start_and_login(env):
    agent = env["agent"]
    # the clean path powers off through the guest agent: wait until it runs (as root: the
    # guest has no D-Bus, and systemctl of a user needs it)
    deadline = time.monotonic() + 120
    check = "sudo -n systemctl is-active qemu-guest-agent"
    while login(env, check).stdout.strip() != "active":
        assert time.monotonic() < deadline, "qemu-guest-agent did not start"
        time.sleep(1)
    doc = agent.ok("POST", f"/vms/{NAME}/shutdown", {"timeout": 120})
    assert doc["state"] == "stopped" and doc["pid"] is None
    assert doc["reason"] is None, doc["reason"]            # a clean shutdown, not forced
    status, err = agent.call("POST", f"/vms/{NAME}/shutdown")
    assert status == 409
    doc = agent.ok("POST", f"/vms/{NAME}/start")
    assert doc["state"] == "running"
    res = login(env, "sudo -n cat /etc/vmctl-test")
    assert res.returncode == 0 and res.stdout.strip() == "from-user-data"


def test_agent_sigkill_then_restart_readopts_running_vm(env):
    agent = env["agent"]
    before = agent.ok("GET", f"/vms/{NAME}")
    agent.stop(signal.SIGKILL)
    # the VM outlives its agent
    assert process_running(before["pid"])
    agent = env["agent"] = AgentProcess(agent.state_dir).start()
    after = agent.ok("GET", f"/vms/{NAME}")
    assert after["state"] == "running"
    assert after["pid"] == before["pid"] and after["ssh_port"] == before["ssh_port"]
    res = login(env, "uptime")
    assert res.returncode == 0, res.stderr
    # QMP was reconnected: a QMP-driven operation works on the adopted VM
    assert agent.ok("GET", f"/vms/{NAME}/snapshots")["snapshots"]


def test_push_config_applies_at_next_boot(env):
    agent = env["agent"]
    doc = agent.ok("POST", f"/vms/{NAME}/config",
                   {"user_data": "write_files:\n  - path: /etc/vmctl-test\n"
                                 "    content: pushed\n"})
    assert doc["config_pending"] is True
    assert "pushed" in agent.ok("GET", f"/vms/{NAME}")["spec"]["user_data"]
    agent.ok("POST", f"/vms/{NAME}/reboot", {"timeout": 60})
    res = login(env, "sudo -n cat /etc/vmctl-test")
    assert res.returncode == 0 and res.stdout.strip() == "pushed"
    assert agent.ok("GET", f"/vms/{NAME}")["config_pending"] is False


def test_hard_reset_starts_a_new_qemu(env):
    agent = env["agent"]
    old = agent.ok("GET", f"/vms/{NAME}")["pid"]
    doc = agent.ok("POST", f"/vms/{NAME}/hard_reset")
    assert doc["state"] == "running" and doc["pid"] != old
    assert login(env, "true").returncode == 0


def test_poweroff_and_delete_leave_nothing(env):
    agent = env["agent"]
    pid = agent.ok("GET", f"/vms/{NAME}")["pid"]
    assert agent.ok("POST", f"/vms/{NAME}/poweroff")["state"] == "stopped"
    assert not process_running(pid)
    assert agent.ok("DELETE", f"/vms/{NAME}") == {"deleted": NAME}
    assert agent.call("GET", f"/vms/{NAME}")[0] == 404
    assert list((agent.state_dir / "vms").iterdir()) == []
    assert agent.ok("GET", "/vms") == {"vms": []}
