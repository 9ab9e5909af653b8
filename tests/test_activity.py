"""The activity guard (vmagent/api/activity.py): what runs on each VM and how the last
operation ended, for every transport."""

from __future__ import annotations

import asyncio

from vmagent.api.activity import Activity
from vmagent.api.dispatch import Dispatcher
from vmagent.context import RequestContext
from vmagent.errors import Conflict
from vmagent.ops import OPERATIONS


def test_busy_while_it_runs_then_the_last_with_its_result():
    activity = Activity()
    gate = asyncio.Event()
    seen = {}

    async def reboot(ctx, name, **kw):
        seen["during"] = activity.of(name)
        await gate.wait()
        return {}

    async def start(ctx, name):
        raise Conflict("not stopped")

    async def generic(ctx, **kw):
        return {}
    handlers = {op.name: generic for op in OPERATIONS}
    handlers.update({"reboot": reboot, "start": start})
    d = Dispatcher(handlers, [activity.guard()])
    ctx = RequestContext.internal()

    async def go():
        task = asyncio.create_task(d.call("reboot", ctx, {"name": "a1"}))
        await asyncio.sleep(0.01)
        assert activity.of("a1")["busy"] == "reboot" and activity.of("b1")["busy"] is None
        gate.set()
        await task
        after = activity.of("a1")
        assert after["busy"] is None and after["last"]["op"] == "reboot"
        assert after["last"]["ok"] is True
        try:
            await d.call("start", ctx, {"name": "a1"})
        except Conflict:
            pass
        assert activity.of("a1")["last"] == {**activity.of("a1")["last"], "op": "start",
                                              "ok": False}
        await d.call("status", ctx, {"name": "a1"})        # reading is not activity
        assert activity.of("a1")["last"]["op"] == "start"
        await d.call("delete", ctx, {"name": "a1"})
        assert activity.of("a1") == {"busy": None, "last": None}
    asyncio.run(go())
    assert seen["during"]["busy"] == "reboot"


def test_the_events_operation_reads_the_vms_event_log(tmp_path):
    import pytest

    from vmagent.errors import BadRequest, NotFound
    from vmagent.vms.events import EventLog
    from vmagent.vms.history import History

    class VM:
        name = "a1"
        event_log = EventLog(tmp_path)

    class Registry:
        def get(self, name):
            if name != "a1":
                raise NotFound(f"no VM named {name!r}")
            return VM()
    for i in range(5):
        VM.event_log.append("state", **{"from": "stopped", "to": f"s{i}"})
    history = History(Registry())
    ctx = RequestContext.internal()
    doc = asyncio.run(history.events(ctx, "a1", limit="2"))
    assert doc["name"] == "a1" and [e["to"] for e in doc["events"]] == ["s3", "s4"]
    assert len(asyncio.run(history.events(ctx, "a1"))["events"]) == 5
    for bad in ("x", 0, 1001):
        with pytest.raises(BadRequest):
            asyncio.run(history.events(ctx, "a1", limit=bad))
    with pytest.raises(NotFound):
        asyncio.run(history.events(ctx, "zz"))
