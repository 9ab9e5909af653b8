"""Placement across hosts: two real ``vmagent serve`` processes on this machine acting
as two hosts (separate state dirs, capacities set by their config files, the qemu stub
as their qemu: no guest boots), and vmctl with a config naming both.

host-a offers 2 cores and 4G (reserve 0.5 core, 1G: 1.5 cores and 3G allocatable);
host-b 4 cores and 8G (3.5 cores and 7G) and serves only segment default. qemu's
overhead is 256M on both, so a VM with ram_limit 1G reserves 1G."""

from __future__ import annotations

import json

import pytest

from agent_helpers import AgentProcess
from cli_helpers import home, run  # noqa: F401
from stub_helpers import install_stub, make_qcow2

pytestmark = pytest.mark.timeout(300)

G = 1 << 30
CONFIGS = {
    "host-a": ('name = "host-a"\nsegments = ["dev", "default"]\n'
               '[capacity]\ncpus = 2\nmemory = "4G"\nreserve_cpus = 0.5\n'
               'reserve_memory = "1G"\nqemu_overhead = "256M"\n[cgroup]\nmode = "none"\n'),
    "host-b": ('name = "host-b"\nsegments = ["default"]\n'
               '[capacity]\ncpus = 4\nmemory = "8G"\nreserve_cpus = 0.5\n'
               'reserve_memory = "1G"\nqemu_overhead = "256M"\n[cgroup]\nmode = "none"\n'
               '[defaults]\nsegment = "default"\n'),
}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    qemu = install_stub(base / "bin")
    image = make_qcow2(base / "base.qcow2")
    agents = {}
    try:
        for name, text in CONFIGS.items():
            (base / f"{name}.toml").write_text(text)
            agent = AgentProcess(base / name, "--config", str(base / f"{name}.toml"),
                                 "--qemu", str(qemu)).start()
            agents[name] = agent
            agent.ok("POST", "/images", {"image": "test", "path": str(image)})
        yield agents
    finally:
        for agent in agents.values():
            agent.cleanup()


@pytest.fixture
def fleet(hosts, home, run, monkeypatch, tmp_path):
    """vmctl with a config naming both hosts (and, with ``down``, a dead third one)."""
    def make(down: bool = False):
        lines = [f'[hosts.{n}]\naddress = "{a.unix}"\n' for n, a in hosts.items()]
        if down:
            lines.append(f'[hosts.host-c]\naddress = "unix://{tmp_path}/dead.sock"\n')
        cfg = tmp_path / "vmctl.toml"
        cfg.write_text("\n".join(lines))
        monkeypatch.setenv("VMCTL_CONFIG", str(cfg))
        return run
    yield make
    for agent in hosts.values():          # every test starts with empty hosts
        for vm in agent.ok("GET", "/vms", timeout=60)["vms"]:
            agent.ok("DELETE", f"/vms/{vm['name']}")


def create(vmctl, name: str, *args: str):
    return vmctl("--json", "create", name, "--image", "test", "--no-wait", *args)


def placed(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["placement"]


def test_placement_fills_the_hosts_by_the_score(fleet, hosts):
    vmctl = fleet()
    chosen = []
    for i in range(4):
        p = placed(create(vmctl, f"f{i}", "--segment", "default", "--ram-limit", "1G"))
        chosen.append(p["chosen"])
    # best fit: host-a (3G) is the tighter fit while it has room, then host-b
    assert chosen == ["host-a", "host-a", "host-a", "host-b"]
    # a dev VM: only host-a serves dev, and it is full
    result = create(vmctl, "dev1", "--segment", "dev", "--ram-limit", "1G")
    assert result.exit_code == 4
    assert "no host can take VM dev1" in result.stderr
    assert "host-a: ram_guarantee 1G > 0B free on host-a" in result.stderr
    assert "host-b: segment dev is not served by host-b (it serves default)" in \
        result.stderr


def test_the_decision_is_said_and_documented(fleet):
    vmctl = fleet()
    result = create(vmctl, "s1", "--segment", "default", "--cpu-guarantee", "1",
                    "--ram-limit", "2G")
    p = placed(result)
    assert p["chosen"] == "host-a" and "best fit" in p["why"]
    by_host = {h["host"]: h for h in p["hosts"]}
    assert by_host["host-a"]["score"] > by_host["host-b"]["score"]
    assert "placing s1" in result.stderr and "s1 goes to host-a" in result.stderr
    st = json.loads(result.stdout)
    assert st["name"] == "s1" and st["state"] == "running"


def test_a_refusal_on_the_chosen_host_moves_on(fleet, hosts, monkeypatch):
    """Another client takes host-a's room between vmctl's look and its create."""
    import vmctl.placement as placement
    decide = placement.decide

    def decide_then_lose_the_race(*args, **kw):
        decision = decide(*args, **kw)
        hosts["host-a"].ok("POST", "/vms", {"name": "faster", "image": "test",
                                            "segment": "default", "ram_limit": "3G",
                                            "ssh_keys": [KEY], "start": False})
        return decision
    monkeypatch.setattr(placement, "decide", decide_then_lose_the_race)
    vmctl = fleet()
    result = create(vmctl, "r1", "--segment", "default", "--ram-limit", "1G")
    p = placed(result)
    assert p["hosts"][0]["host"] == "host-a"           # it was the best ...
    assert p["chosen"] == "host-b"                     # ... and refused
    assert p["refused"] == {"host-a": "ram_guarantee 1G > 0B free on host-a"}
    assert "host-a refused r1" in result.stderr
    assert hosts["host-b"].ok("GET", "/vms/r1")["name"] == "r1"


def test_a_request_that_fits_nowhere_lists_each_hosts_reason(fleet, hosts):
    vmctl = fleet()
    result = create(vmctl, "huge", "--segment", "default", "--ram-guarantee", "16G",
                    "--ram-limit", "16G")
    assert result.exit_code == 4
    assert ("no host can take VM huge: host-a: ram_guarantee 16G > 3G free on host-a; "
            "host-b: ram_guarantee 16G > 7G free on host-b") in result.stderr
    for agent in hosts.values():
        assert agent.ok("GET", "/vms")["vms"] == []


def test_a_host_that_is_down_is_skipped_and_said(fleet):
    vmctl = fleet(down=True)
    result = create(vmctl, "d1", "--segment", "default", "--ram-limit", "1G")
    p = placed(result)
    assert p["chosen"] == "host-a"
    assert [u["host"] for u in p["unreachable"]] == ["host-c"]
    assert "host-c: unreachable, skipped" in result.stderr
    listing = vmctl("--json", "list")
    assert listing.exit_code == 0
    doc = json.loads(listing.stdout)
    assert [v["name"] for v in doc["vms"]] == ["d1"]
    assert doc["unreachable"][0]["host"] == "host-c"
    assert "host-c: not listed" in listing.stderr


def test_pinned_list_and_the_fleets_list(fleet):
    vmctl = fleet()
    assert placed(create(vmctl, "l1", "--segment", "default", "--ram-limit", "3G")) \
        ["chosen"] == "host-a"
    assert placed(create(vmctl, "l2", "--segment", "default", "--ram-limit", "1G")) \
        ["chosen"] == "host-b"
    doc = json.loads(vmctl("--json", "list").stdout)
    assert [(v["name"], v["host"]) for v in doc["vms"]] == [("l1", "host-a"),
                                                           ("l2", "host-b")]
    human = vmctl("list").stdout
    assert "HOST" in human.splitlines()[0] and "host-b" in human
    pinned = json.loads(vmctl("--json", "list", "--host", "host-b").stdout)
    assert [v["name"] for v in pinned["vms"]] == ["l2"] and "host" not in pinned["vms"][0]
    # --host pins a create too
    result = vmctl("--json", "create", "p1", "--image", "test", "--no-wait", "--segment",
                   "default", "--ram-limit", "1G", "-H", "host-b")
    assert result.exit_code == 0 and "placement" not in json.loads(result.stdout)
    # a command on one VM finds its host
    show = vmctl("--json", "show", "l2")
    assert show.exit_code == 0 and json.loads(show.stdout)["name"] == "l2"
    missing = vmctl("show", "nope")
    assert missing.exit_code == 3 and "no VM named 'nope' on host-a, host-b" in \
        missing.stderr
    # a name taken on one host is not created on another
    again = create(vmctl, "l2", "--segment", "default", "--ram-limit", "1G")
    assert again.exit_code == 4 and "already exists on host-b" in again.stderr


def test_host_list_shows_every_hosts_resources(fleet):
    vmctl = fleet()
    placed(create(vmctl, "h1", "--segment", "default", "--cpu-guarantee", "0.5",
                  "--ram-limit", "1G"))
    doc = json.loads(vmctl("--json", "host", "list").stdout)
    rows = {r["name"]: r for r in doc["hosts"]}
    a, b = rows["host-a"]["resources"], rows["host-b"]["resources"]
    assert a["cpu"] == {"unit": "cores", "total": 2, "reserved": 0.5, "allocatable": 1.5,
                        "guaranteed": 0.5, "free": 1.0, "in_flight": 0}
    assert (a["memory"]["allocatable"], a["memory"]["guaranteed"]) == (3 * G, G)
    assert b["memory"]["free"] == 7 * G and rows["host-b"]["segments"] == ["default"]
    human = vmctl("host", "list").stdout
    assert "0.5/1.5/2" in human and "1.0G/3.0G/4.0G" in human and "default" in human


def test_dry_run_shows_the_choice_and_creates_nothing(fleet, hosts):
    vmctl = fleet()
    result = vmctl("--json", "create", "dry1", "--image", "test", "--segment", "default",
                   "--ram-limit", "1G", "--dry-run")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["dry_run"] is True and doc["placement"]["chosen"] == "host-a"
    assert doc["allocation"]["host"] == "host-a"
    human = vmctl("create", "dry1", "--image", "test", "--segment", "default",
                  "--ram-limit", "1G", "--dry-run")
    assert "# allocation on host-a: reserves 0 cores, 1G RAM" in human.stdout
    assert "dry1 would go to host-a" in human.stderr
    for agent in hosts.values():
        assert agent.ok("GET", "/vms")["vms"] == []


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBdM09Ct5ZbpGEQm6BvLA/Ji8N4McDg7RPn/6+OGhCmD t@x"
