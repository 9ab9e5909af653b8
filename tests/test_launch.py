"""qemu start failures through the agent: typed errors with qemu's own output, and
nothing half-made left behind. These start qemu but boot no guest."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import time

import pytest

from agent_helpers import AgentProcess, process_running, require_test_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    require_test_image()
    base = tmp_path_factory.mktemp("launch")
    a = AgentProcess(base / "state").start()
    a.register_key()
    a.import_test_image()
    yield a
    a.stop()


def test_corrupt_disk_gives_qemu_failure_with_its_output(agent):
    agent.ok("POST", "/vms", {"name": "corrupt", "image": "test", "start": False})
    disk = agent.state_dir / "vms" / "corrupt" / "disk.qcow2"
    with open(disk, "r+b") as f:
        f.write(b"\0" * 4096)                # no longer a qcow2 header
    status, err = agent.call("POST", "/vms/corrupt/start")
    assert status == 500 and err["error"] == "qemu_failed", err
    assert err["details"]["exitcode"] == 1
    assert err["details"]["command"][0] == "qemu-system-x86_64"
    assert "qcow2" in err["details"]["output"].lower()
    st = agent.ok("GET", "/vms/corrupt")
    assert st["state"] == "stopped" and st["pid"] is None
    assert "qemu failed to start" in st["reason"]
    agent.ok("DELETE", "/vms/corrupt")


def test_create_whose_qemu_fails_leaves_nothing(agent, tmp_path):
    """A wrapper that adds an option qemu rejects: the real qemu fails."""
    wrapper = tmp_path / "bin" / "qemu-system-x86_64"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('qemu-system-x86_64')} "
                       "-no-such-option \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    state = tmp_path / "state2"
    a = AgentProcess(state, "--qemu", str(wrapper)).start()
    try:
        a.register_key()
        a.import_test_image()
        status, err = a.call("POST", "/vms", {"name": "never", "image": "test"})
        assert status == 500 and err["error"] == "qemu_failed"
        assert "no-such-option" in err["details"]["output"]
        assert a.call("GET", "/vms/never")[0] == 404
        assert os.listdir(state / "vms") == []
    finally:
        a.stop()


def test_taken_ssh_port_is_replaced_by_a_free_one(agent, tmp_path):
    """qemu fails on a host forward whose port is taken; the agent picks another.
    The wrapper occupies the requested port the first time, like a racing process."""
    marker = tmp_path / "first"
    wrapper = tmp_path / "bin" / "qemu-system-x86_64"
    wrapper.parent.mkdir()
    wrapper.write_text(f"""#!/bin/sh
if [ ! -e {marker} ]; then
    touch {marker}
    echo "qemu-system-x86_64: -netdev user,id=net0,hostfwd=...: Could not set up host forwarding rule 'tcp:127.0.0.1:1-:22'" >&2
    exit 1
fi
exec {shutil.which('qemu-system-x86_64')} "$@"
""")
    wrapper.chmod(0o755)
    a = AgentProcess(tmp_path / "state3", "--qemu", str(wrapper)).start()
    try:
        a.register_key()
        a.import_test_image()
        st = a.ok("POST", "/vms", {"name": "retry", "image": "test", "memory": "512M"})
        assert st["state"] == "running" and marker.exists()
        a.ok("DELETE", "/vms/retry")
    finally:
        a.stop()


def _kill_qemu(pid: int) -> None:
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while process_running(pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_qemu_gone_while_agent_down_is_marked_broken(tmp_path):
    """Restart after SIGKILL: a VM whose qemu vanished meanwhile is broken, not running;
    one whose qemu still runs is re-adopted with its pid."""
    a = AgentProcess(tmp_path / "state").start()
    a.register_key()
    a.import_test_image()
    gone = a.ok("POST", "/vms", {"name": "gone", "image": "test", "memory": "256M"})
    kept = a.ok("POST", "/vms", {"name": "kept", "image": "test", "memory": "256M"})
    a.stop(signal.SIGKILL)
    _kill_qemu(gone["pid"])
    a = AgentProcess(tmp_path / "state").start()
    try:
        st = a.ok("GET", "/vms/gone")
        assert st["state"] == "broken" and "unexpectedly" in st["reason"]
        assert a.ok("GET", "/vms/kept")["pid"] == kept["pid"]
        # the watcher notices a qemu that dies while the agent runs
        _kill_qemu(kept["pid"])
        deadline = time.monotonic() + 15
        while (st := a.ok("GET", "/vms/kept"))["state"] == "running":
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert st["state"] == "broken" and st["link_alive"] is False
        # a broken VM can be started again
        assert a.ok("POST", "/vms/gone/start")["state"] == "running"
        a.ok("DELETE", "/vms/gone")
        a.ok("DELETE", "/vms/kept")
    finally:
        a.stop()
