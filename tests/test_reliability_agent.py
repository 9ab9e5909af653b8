"""Reliability of a real agent process whose qemu is the stub (tests/qemu_stub.py: no
guest boots): the agent killed (SIGKILL) at each step of create, start and delete; a
full file system; many operations at once. Each test names the promise it checks
(docs/reliability.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent_helpers import AgentProcess
from stub_helpers import KEY, install_stub, make_qcow2, process_gone


@pytest.fixture
def stub(tmp_path) -> Path:
    return install_stub(tmp_path / "bin")


def _agent(state: Path, stub: Path, faults: str | None = None) -> AgentProcess:
    env = {"VMAGENT_FAULTS": faults} if faults else None
    a = AgentProcess(state, "--qemu", str(stub), env=env)
    return a.start()


def _prepare(a: AgentProcess, tmp_path: Path) -> None:
    a.ok("POST", "/keys", {"keys": KEY})
    a.ok("POST", "/images", {"image": "test",
                             "path": str(make_qcow2(tmp_path / "base.qcow2"))})


def _killed(a: AgentProcess, method: str, path: str, body: dict | None = None) -> None:
    """The request dies with the agent (SIGKILL at the fault point)."""
    with pytest.raises((ConnectionError, OSError, Exception)):
        a.call(method, path, body, timeout=30)
    a.proc.wait(30)
    assert a.proc.returncode == -signal.SIGKILL


def _qemu_pids(state: Path) -> list[int]:
    pids = []
    for pidfile in state.glob("vms/*/qemu.pid"):
        try:
            pids.append(int(pidfile.read_text()))
        except (OSError, ValueError):
            pass
    return pids


@pytest.mark.parametrize("point", ["create.staged", "create.launched"])
def test_an_interrupted_create_is_rolled_back(tmp_path, stub, point):
    """Promise: after a restart a VM is either absent or what the create promised; a
    create that never answered is absent, and its qemu does not run on."""
    state = tmp_path / "state"
    a = _agent(state, stub)
    _prepare(a, tmp_path)
    a.stop()
    a = _agent(state, stub, point)
    _killed(a, "POST", "/vms", {"name": "half", "image": "test"})
    pids = _qemu_pids(state)
    assert (point == "create.launched") == bool(pids)
    a = _agent(state, stub)
    try:
        assert a.call("GET", "/vms/half")[0] == 404
        assert sorted(p.name for p in (state / "vms").iterdir()) == []
        for pid in pids:
            deadline = time.monotonic() + 10
            while not process_gone(pid):
                assert time.monotonic() < deadline, f"qemu {pid} still runs"
                time.sleep(0.05)
        # and the name is free again
        assert a.ok("POST", "/vms", {"name": "half", "image": "test"})["state"] == "running"
    finally:
        a.cleanup()


def test_an_interrupted_start_leaves_the_vm_stopped_and_startable(tmp_path, stub):
    """Promise: a start the agent did not finish is not reported as a crash."""
    state = tmp_path / "state"
    a = _agent(state, stub)
    _prepare(a, tmp_path)
    a.ok("POST", "/vms", {"name": "s1", "image": "test", "start": False})
    a.stop()
    a = _agent(state, stub, "start.starting")
    _killed(a, "POST", "/vms/s1/start")
    a = _agent(state, stub)
    try:
        st = a.ok("GET", "/vms/s1")
        assert st["state"] == "stopped" and "interrupted" in st["reason"], st
        assert a.ok("POST", "/vms/s1/start")["state"] == "running"
    finally:
        a.cleanup()


@pytest.mark.parametrize("point", ["delete.marked", "delete.stopped"])
def test_an_interrupted_delete_is_finished(tmp_path, stub, point):
    """Promise: a delete that began ends after a restart: no VM, no qemu, no files."""
    state = tmp_path / "state"
    a = _agent(state, stub)
    _prepare(a, tmp_path)
    pid = a.ok("POST", "/vms", {"name": "d1", "image": "test"})["pid"]
    a.stop()
    a = _agent(state, stub, point)
    _killed(a, "DELETE", "/vms/d1")
    a = _agent(state, stub)
    try:
        assert a.call("GET", "/vms/d1")[0] == 404
        assert list((state / "vms").iterdir()) == []
        deadline = time.monotonic() + 10
        while not process_gone(pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        a.cleanup()


# --- a full file system -----------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\1" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_is_a_clear_error_that_leaves_nothing_and_delete_still_works(
        tmp_path, stub, tiny_fs):
    """Promise: every 'no space left' is one clear error with the free bytes; nothing is
    left half-made; deleting works on a full disk (it frees space)."""
    state = tiny_fs / "state"
    a = _agent(state, stub)
    try:
        _prepare(a, tmp_path)
        a.ok("POST", "/vms", {"name": "v1", "image": "test", "start": False})
        filler = _fill(tiny_fs)
        status, err = a.call("POST", "/vms", {"name": "v2", "image": "test",
                                              "start": False})
        assert status == 507 and err["error"] == "no_space", err
        assert "file system is full" in err["message"] and "bytes free" in err["message"]
        assert sorted(p.name for p in (state / "vms").iterdir()) == ["v1"]
        assert a.ok("DELETE", "/vms/v1") == {"deleted": "v1"}       # on the full disk
        assert list((state / "vms").iterdir()) == []
        filler.unlink()
        assert a.ok("POST", "/vms", {"name": "v2", "image": "test",
                                     "start": False})["state"] == "stopped"
    finally:
        a.cleanup()


# --- many at once ---------------------------------------------------------------------------

def test_fifty_operations_at_once_on_one_vm_are_serialized(tmp_path, stub):
    """Promise: concurrent operations on one VM run one at a time and each gets a clear
    answer (200 or 409), never a 500 or a torn state file."""
    a = _agent(tmp_path / "state", stub)
    try:
        _prepare(a, tmp_path)
        a.ok("POST", "/vms", {"name": "busy", "image": "test"})
        ops = [("POST", "/vms/busy/poweroff"), ("POST", "/vms/busy/start"),
               ("POST", "/vms/busy/reset"), ("GET", "/vms/busy"),
               ("POST", "/vms/busy/snapshots")] * 10
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda op: a.call(op[0], op[1], {} if op[0] == "POST"
                                                      else None)[0], ops))
        assert set(answers) <= {200, 409}, answers
        state = json.loads((a.state_dir / "vms/busy/state.json").read_text())
        st = a.ok("GET", "/vms/busy")
        assert state["state"] == st["state"] in ("running", "stopped")
        assert (st["pid"] is not None) == (st["state"] == "running")
    finally:
        a.cleanup()


def test_parallel_creates_of_one_name_make_one_vm(tmp_path, stub):
    a = _agent(tmp_path / "state", stub)
    try:
        _prepare(a, tmp_path)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: a.call("POST", "/vms", {
                "name": "same", "image": "test", "start": False})[0], range(8)))
        assert sorted(answers) == [201] + [409] * 7
        assert [v["name"] for v in a.ok("GET", "/vms")["vms"]] == ["same"]
    finally:
        a.cleanup()


def test_parallel_deletes_remove_everything_once(tmp_path, stub):
    a = _agent(tmp_path / "state", stub)
    try:
        _prepare(a, tmp_path)
        names = [f"p{i}" for i in range(8)]
        pids = [a.ok("POST", "/vms", {"name": n, "image": "test"})["pid"] for n in names]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda n: a.call("DELETE", f"/vms/{n}")[0],
                                    names + names))
        assert sorted(answers) == [200] * 8 + [404] * 8
        assert a.ok("GET", "/vms") == {"vms": []} and list((a.state_dir / "vms").iterdir()) == []
        deadline = time.monotonic() + 10
        while not all(process_gone(p) for p in pids):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        a.cleanup()


def test_names_that_are_not_names_are_refused(tmp_path, stub):
    a = _agent(tmp_path / "state", stub)
    try:
        _prepare(a, tmp_path)
        for name in ("../x", "A", "a" * 64, "-x", "x_y", "", "x/y", "é"):
            status, doc = a.call("POST", "/vms", {"name": name, "image": "test",
                                                  "start": False})
            assert status == 400 and doc["error"] == "bad_request", (name, doc)
        assert os.listdir(a.state_dir / "vms") == []
    finally:
        a.cleanup()
