"""The agent's shared pieces: jobs, poll_until, staged directories, versioned records,
the state transitions and the dispatcher's guards. No qemu."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import pytest

from vmagent import ops
from vmagent.api.dispatch import Dispatcher, lock_guard
from vmagent.context import RequestContext
from vmagent.errors import BadRequest, Conflict, InternalError, Timeout
from vmagent.fsutil import (FormatError, StagedDir, read_record, remove_dir, sweep,
                            write_record)
from vmagent.jobs import Job, Jobs
from vmagent.poll import poll_until
from vmagent.vms.state import TRANSITIONS, State, check_transition

CTX = RequestContext.internal("test")


# --- jobs ---------------------------------------------------------------------------------

def test_job_reports_steps_and_keeps_a_failed_jobs_log_tail(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("booting\nCloud-init v. 22.4 running 'init'\n")
    job = Job("template_build", "t1", steps=("image", "disk", "boot"), log_path=log)
    job.begin("image")
    job.begin("disk")
    doc = job.to_json()
    assert doc["state"] == "running" and doc["step"] == "disk"
    assert [(s["name"], s["state"]) for s in doc["steps"]] == [("image", "done"),
                                                               ("disk", "running")]
    assert doc["all_steps"] == ["image", "disk", "boot"]
    assert "Cloud-init v. 22.4" in doc["log_tail"]
    job.fail("qemu exited")
    log.unlink()                    # the staging dir goes away after a failure
    doc = job.to_json()
    assert doc["state"] == "failed" and doc["error"] == "qemu exited"
    assert doc["failed_step"] == "disk" and doc["steps"][-1]["state"] == "failed"
    assert "Cloud-init" in doc["log_tail"]
    job.fail("a later error")       # the first one counts
    assert job.to_json()["error"] == "qemu exited"


def test_job_persists_and_an_interrupted_one_fails_after_a_restart(tmp_path):
    d = tmp_path / "builds" / "img"
    d.mkdir(parents=True)
    job = Jobs().add(Job("image_build", "img", steps=("a", "b"), directory=d,
                         extra={"image": "img"}))
    job.begin("a")
    job.set_progress(10, 100)       # kept with the next save (not at every chunk)
    job.begin("b")
    cleaned = []
    jobs = Jobs()                   # a new agent
    jobs.recover("image_build", tmp_path / "builds", cleaned.append)
    again = jobs.get("image_build", "img")
    assert cleaned and cleaned[0].name == "img"
    doc = again.to_json()
    assert doc["state"] == "failed" and doc["failed_step"] == "b"
    assert doc["error"] == "the agent stopped during step b"
    assert [s["state"] for s in doc["steps"]] == ["done", "failed"]
    assert doc["image"] == "img" and doc["progress"] == {"done": 10, "total": 100}
    assert json.loads((d / "status.json").read_text())["format"] == 1


def test_jobs_run_records_success_errors_and_cancellation():
    async def main():
        jobs = Jobs()

        async def ok(job):
            job.begin("one")
            return {"answer": 42}

        async def bad(job):
            job.begin("one")
            raise Conflict("no room")

        async def slow(job):
            job.begin("wait")
            await asyncio.sleep(60)

        assert await jobs.run(Job("k", "a"), ok) == {"answer": 42}
        assert jobs.get("k", "a").to_json()["result"] == {"answer": 42}
        with pytest.raises(Conflict):
            await jobs.run(Job("k", "b"), bad)
        assert jobs.get("k", "b").to_json()["error"] == "no room"
        started = jobs.start(Job("k", "c"), slow)
        await poll_until(lambda: started.step == "wait", 5, interval=0.01)
        assert jobs.running("k") == [started]
        await jobs.close()
        assert started.to_json()["state"] == "cancelled"
        assert jobs.running("k") == []

    asyncio.run(main())


# --- poll_until ----------------------------------------------------------------------------

def test_poll_until_returns_the_first_truthy_result_or_times_out():
    async def main():
        seen = iter([None, 0, "", "yes"])
        assert await poll_until(lambda: next(seen), 5, interval=0.001) == "yes"

        async def never():
            return False
        assert await poll_until(never, 0.05, interval=0.01) is False
        with pytest.raises(Timeout, match="nothing came"):
            await poll_until(never, 0.05, interval=0.01, error="nothing came")
        with pytest.raises(Conflict):
            await poll_until(never, 0.05, error=lambda: Conflict("custom"))

    asyncio.run(main())


# --- directories and records ---------------------------------------------------------------

def test_staged_dir_appears_at_once_or_not_at_all(tmp_path):
    with StagedDir(tmp_path, "vm1") as st:
        (st.path / "f").write_text("x")
        assert st.path.name.startswith(".new-vm1-")
        st.commit(tmp_path / "vm1")
    assert (tmp_path / "vm1" / "f").read_text() == "x"
    with pytest.raises(RuntimeError):
        with StagedDir(tmp_path, "vm2") as st:
            (st.path / "f").write_text("x")
            os.chmod(st.path / "f", 0o444)
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm1"]
    with pytest.raises(FileExistsError):
        with StagedDir(tmp_path, "vm1") as st:
            st.commit(tmp_path / "vm1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm1"]


def test_remove_dir_and_sweep_leave_nothing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ro").write_text("x")
    os.chmod(tmp_path / "a" / "ro", 0o444)
    remove_dir(tmp_path / "a")
    (tmp_path / ".new-b-1234").mkdir()
    (tmp_path / ".del-c-5678").mkdir()
    (tmp_path / "keep").mkdir()
    assert len(sweep(tmp_path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_records_are_versioned_and_upgraded(tmp_path):
    path = tmp_path / "r.json"
    write_record(path, {"a": 1}, 2)
    assert json.loads(path.read_text()) == {"format": 2, "a": 1}
    assert read_record(path, 2) == {"a": 1}
    path.write_text('{"old": true}')               # format 0: no key
    up = read_record(path, 2, {0: lambda d: {**d, "one": 1}, 1: lambda d: {**d, "two": 2}})
    assert up == {"old": True, "one": 1, "two": 2}
    write_record(path, {"a": 1}, 3)
    with pytest.raises(FormatError, match="newer vmagent"):
        read_record(path, 2)
    path.write_text("[1, 2]")
    with pytest.raises(FormatError):
        read_record(path, 2)


# --- states ----------------------------------------------------------------------------

def test_transitions_are_declared_for_every_state():
    assert set(TRANSITIONS) == set(State)
    check_transition("v", State.STOPPED, State.STARTING)
    with pytest.raises(InternalError, match="deleting -> running"):
        check_transition("v", State.DELETING, State.RUNNING)
    with pytest.raises(InternalError, match="stopped -> stopping"):
        check_transition("v", State.STOPPED, State.STOPPING)


# --- dispatcher ----------------------------------------------------------------------------

def _handlers(calls):
    def handler(name):
        async def run(ctx, **params):
            calls.append((name, params))
            return {"op": name}
        return run
    return {op.name: handler(op.name) for op in ops.OPERATIONS}


def test_dispatcher_needs_a_handler_for_every_row():
    handlers = _handlers([])
    Dispatcher(handlers)
    del handlers["reset"]
    with pytest.raises(ValueError, match="reset"):
        Dispatcher(handlers)
    with pytest.raises(ValueError, match="nope"):
        Dispatcher({**_handlers([]), "nope": handlers["start"]})


def test_lock_guard_serializes_locked_rows_of_one_vm():
    calls, order = [], []
    locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def locked(name):
        lock = locks.setdefault(name, asyncio.Lock())
        async with lock:
            order.append(("in", name))
            yield
            order.append(("out", name))

    async def main():
        d = Dispatcher(_handlers(calls), [lock_guard(locked)])
        await asyncio.gather(d.call("start", CTX, {"name": "a"}),
                             d.call("reset", CTX, {"name": "a"}))
        assert order == [("in", "a"), ("out", "a"), ("in", "a"), ("out", "a")]
        order.clear()
        assert await d.call("status", CTX, {"name": "a"}) == {"op": "status"}
        assert order == []                     # not a locked row
        with pytest.raises(BadRequest, match="name is required"):
            await d.call("create", CTX, {})

    asyncio.run(main())


def test_every_row_names_its_target_consistently():
    for op in ops.OPERATIONS:
        assert op.target in ops.TARGETS, op
        for p in op.path_params:          # a path parameter names the row's target
            assert ops.TARGET_PARAM[op.target] == p, op
        if op.lock:
            assert op.target == "vm", op
        assert (op.stream is None) or op.stream in ops.STREAMS
        assert op.timeout > 0


def test_an_ephemeral_vm_is_never_restarted():
    """Healing and ephemeral deletion would race for a broken ephemeral VM: the spec
    refuses the combination and the policy in force is never."""
    from vmagent.spec import VMSpec
    spec = VMSpec.from_dict({"name": "job1", "image": "test", "ephemeral": True,
                             "segment": "default"})
    assert spec.restart_policy == "never"
    with pytest.raises(BadRequest, match="ephemeral"):
        VMSpec.from_dict({"name": "job1", "image": "test", "ephemeral": True,
                          "restart": "always"})
