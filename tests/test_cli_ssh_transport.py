"""The ssh:// transport against a real, private sshd on localhost forwarding to the agent."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from cli_helpers import (SSHD, _keygen, agent, ensure_test_image, home, local,  # noqa: F401
                         run, ssh_address, ssh_home, sshd)
from vmctl.address import parse_address, Target
from vmctl.client import AgentClient

pytestmark = pytest.mark.skipif(not SSHD.exists() or not shutil.which("ssh-keygen"),
                                reason="needs openssh-server")


def test_host_show_over_ssh(run, agent, sshd, ssh_home):
    result = run("--json", "--host", ssh_address(sshd, agent), "host", "show")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["state_dir"] == str(agent.state_dir)


def test_dry_run_over_ssh_matches_local(run, local, agent, sshd, ssh_home):
    ensure_test_image(local)
    args = ["--json", "create", "over-ssh", "--image", "test", "--ssh-key",
            ssh_home / ".ssh" / "id_ed25519.pub", "--dry-run"]
    remote = run("--host", ssh_address(sshd, agent), *args)
    assert remote.exit_code == 0, remote.stderr
    doc = json.loads(remote.stdout)
    assert doc["dry_run"] and doc["spec"]["name"] == "over-ssh"


def test_agent_tcp_port_over_ssh_with_token(run, agent, sshd, ssh_home, monkeypatch):
    address = f"ssh://root@127.0.0.1:{sshd['port']}?agent_port={agent.port}"
    assert run("--host", address, "list").exit_code == 8
    monkeypatch.setenv("VMCTL_TOKEN_FILE", str(agent.token_file))
    result = run("--json", "--host", address, "list")
    assert result.exit_code == 0, result.stderr


def test_unknown_host_key_is_refused(run, agent, sshd, ssh_home):
    (ssh_home / ".ssh" / "known_hosts").write_text("")
    result = run("--host", ssh_address(sshd, agent), "list")
    assert result.exit_code == 6
    assert "not in known_hosts" in result.stderr


def test_wrong_host_key_is_refused(run, agent, sshd, ssh_home, tmp_path):
    other = _keygen(tmp_path / "other")
    kind, key = other.split()[:2]
    (ssh_home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd['port']} {kind} {key}\n")
    result = run("--host", ssh_address(sshd, agent), "list")
    assert result.exit_code == 6 and "does not match" in result.stderr


def test_no_agent_behind_the_tunnel(run, sshd, ssh_home, tmp_path):
    result = run("--host", f"ssh://root@127.0.0.1:{sshd['port']}{tmp_path}/none.sock", "list")
    assert result.exit_code == 6
    assert "refused to forward" in result.stderr


def test_not_authorized_user(run, agent, sshd, ssh_home):
    result = run("--host", f"ssh://nobody@127.0.0.1:{sshd['port']}{agent.socket}", "list")
    assert result.exit_code == 6 and "SSH failed" in result.stderr


def test_ssh_config_uses_the_proxy_for_a_remote_agent(local, run, agent, sshd, ssh_home):
    ensure_test_image(local)
    assert local("create", "proxy0", "--image", "test", "--no-start").exit_code == 0
    try:
        result = run("--host", ssh_address(sshd, agent), "ssh-config", "proxy0")
        assert result.exit_code == 0, result.stderr
        assert "ProxyCommand " in result.stdout
        assert f"--host {ssh_address(sshd, agent)} proxy proxy0" in result.stdout
        assert "HostName proxy0" in result.stdout
    finally:
        local("delete", "proxy0", "--yes")


@pytest.mark.integration                    # qemu starts: its first output arrives
def test_console_websocket_over_ssh(local, agent, sshd, ssh_home):
    """A websocket (the console) through the tunnel: qemu's first output arrives."""
    ensure_test_image(local)
    assert local("create", "ws0", "--image", "test", "--memory", "256M",
                 "--no-start").exit_code == 0
    try:
        assert local("start", "ws0").exit_code == 0
        client = AgentClient(Target(parse_address(ssh_address(sshd, agent))))

        async def first_bytes() -> bytes:
            session, ws = await client.websocket("console", name="ws0")
            try:
                await ws.send_bytes(b"\r")
                got = b""
                while len(got) < 20:
                    msg = await asyncio.wait_for(ws.receive(), 30)
                    if msg.type.name != "BINARY":
                        break
                    got += msg.data
                return got
            finally:
                await ws.close()
                await session.close()
        try:
            data = asyncio.run(first_bytes())
        finally:
            client.close()
        assert len(data) >= 20, data
    finally:
        local("poweroff", "ws0")
        local("delete", "ws0", "--yes")
