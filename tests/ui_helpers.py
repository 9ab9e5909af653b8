"""The web UI in-process over a real dispatcher (the real access, activity and lock
guards) whose handlers are fakes: two people's VMs, no qemu. For the fast tests of
sessions, CSRF, links, headers and the access rules of every UI route."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from typing import Any, AsyncIterator

from aiohttp.test_utils import TestClient, TestServer

from vmagent.api.access import access_guard
from vmagent.api.activity import Activity
from vmagent.api.dispatch import Dispatcher, lock_guard
from vmagent.api.links import LinkService, LinkTokens
from vmagent.api.server import build_app
from vmagent.api.ui.assets import Assets
from vmagent.api.ui.routes import WebUI
from vmagent.context import Caller, RequestContext, Role
from vmagent.errors import Conflict, NotFound, Unauthorized
from vmagent.ops import OPERATIONS
from vmagent.vms.streams import Stream

TOKENS = {"tok-alice": Caller("alice", Role.USER, token_id="ta"),
          "tok-bob": Caller("bob", Role.USER, token_id="tb"),
          "tok-olga": Caller("olga", Role.OPERATOR, token_id="to")}
VMS = {"a1": "alice", "b1": "bob"}


def status(name: str, state: str = "running") -> dict:
    return {"name": name, "state": state, "owner": VMS[name], "ssh_ready": True,
            "link_alive": True, "net_alive": True, "ssh_port": 2222, "ssh_user": VMS[name],
            "ssh_host": "127.0.0.1", "accounts": [VMS[name]], "cloud_init": "done",
            "boot": {"kernel": True}, "reason": None, "accel": "tcg",
            "spec": {"name": name, "image": "test", "cpus": 1, "memory": 1 << 30,
                     "disk": 4 << 30, "admins": [], "segment": "dev"}}


class FakeAgent:
    """What the UI needs of an agent, with a record of every dispatched call."""

    def __init__(self, tls: bool = False) -> None:
        self.calls: list[tuple[str, RequestContext, dict]] = []
        self.revoked: set[str] = set()
        self.activity = Activity()
        self.links = LinkService(LinkTokens(), lambda n: n in VMS)
        self.links.base_url = "http://agent.example:8765"
        handlers = {op.name: self._generic(op.name) for op in OPERATIONS}
        handlers.update({"list": self._list, "status": self._status, "events": self._events,
                         "snapshots": self._snapshots, "host": self._host,
                         "image_list": self._images, "template_list": self._templates,
                         "console": self._stream, "vnc": self._stream,
                         "console_log": self._console_log, "create": self._create,
                         "vnc_link": self.links.vnc_link, "ui_link": self.links.ui_link})
        people = (lambda n: (VMS[n], []) if n in VMS else None)
        self.dispatcher = Dispatcher(handlers, [access_guard(people), self.activity.guard(),
                                                lock_guard(self._locked)])
        self.ui = WebUI(self.dispatcher, self.links.tokens, self.activity,
                        identify=TOKENS.get, still_valid=self._valid,
                        assets=Assets(novnc=None, xterm=None), tls=tls)
        self.echo_tasks: list[asyncio.Task] = []

    def _valid(self, caller: Caller) -> bool:
        return caller.token_id not in self.revoked

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        yield

    def _record(self, op: str, ctx: RequestContext, params: dict) -> None:
        self.calls.append((op, ctx, params))

    def _generic(self, op: str):
        async def handler(ctx: RequestContext, **params: Any) -> dict:
            self._record(op, ctx, params)
            name = params.get("name")
            if name is not None and name not in VMS:
                raise NotFound(f"no VM named {name!r}")
            return status(name) if name in VMS else {"ok": True}
        return handler

    async def _list(self, ctx: RequestContext, **params: Any) -> dict:
        self._record("list", ctx, params)
        me = ctx.caller
        return {"vms": [status(n) for n, owner in VMS.items()
                        if me.is_operator or owner == me.user]}

    async def _status(self, ctx: RequestContext, name: str) -> dict:
        self._record("status", ctx, {"name": name})
        if name not in VMS:
            raise NotFound(f"no VM named {name!r}")
        return status(name)

    async def _events(self, ctx: RequestContext, name: str, limit: Any = 100) -> dict:
        return {"name": name, "events": [{"time": 1.0, "type": "state", "from": "starting",
                                          "to": "running"}]}

    async def _snapshots(self, ctx: RequestContext, name: str) -> dict:
        return {"snapshots": [{"name": "s1", "date": 1.0, "vm_state_size": 1 << 20}]}

    async def _host(self, ctx: RequestContext) -> dict:
        return {"accel": {"name": "tcg"}, "capacity": {"cpus": 2, "memory": 1 << 34,
                                                       "disk_free": 1 << 35}}

    async def _images(self, ctx: RequestContext) -> dict:
        return {"images": [{"name": "test"}], "catalog": []}

    async def _templates(self, ctx: RequestContext) -> dict:
        return {"templates": [{"name": "tpl"}]}

    async def _console_log(self, ctx: RequestContext, name: str, **params: Any) -> dict:
        return {"offset": 5, "size": 5, "data": "login"}

    async def _create(self, ctx: RequestContext, **params: Any) -> dict:
        self._record("create", ctx, params)
        if params.get("name") in VMS:
            raise Conflict(f"VM {params['name']} exists")
        return {"name": params.get("name"), "state": "running"}

    async def _stream(self, ctx: RequestContext, name: str) -> Stream:
        """An echo of what the websocket sends (in place of the console or VNC)."""
        self._record("stream", ctx, {"name": name})
        if name not in VMS:
            raise NotFound(f"no VM named {name!r}")
        ours, theirs = socket.socketpair()

        async def echo() -> None:
            reader, writer = await asyncio.open_connection(sock=theirs)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
        self.echo_tasks.append(asyncio.create_task(echo()))
        return Stream(*await asyncio.open_connection(sock=ours))

    def app(self):
        class NoBearer:
            def authenticate(self, request):
                raise Unauthorized("a valid bearer token is required")
        return build_app(self.dispatcher, NoBearer(), ui=self.ui.app())


@contextlib.asynccontextmanager
async def ui_client(tls: bool = False) -> AsyncIterator[tuple[TestClient, FakeAgent]]:
    agent = FakeAgent(tls=tls)
    client = TestClient(TestServer(agent.app()))
    await client.start_server()
    try:
        yield client, agent
    finally:
        await client.close()
        for t in agent.echo_tasks:
            t.cancel()


def csrf_of(text: str) -> str:
    m = re.search(r'name="csrf(?:-token)?" (?:content|value)="([^"]+)"', text)
    assert m, text[:500]
    return m.group(1)


async def sign_in(client: TestClient, token: str = "tok-alice") -> str:
    """Sign in through the form; returns the session's CSRF token."""
    page = await client.get("/ui/login")
    form_csrf = csrf_of(await page.text())
    resp = await client.post("/ui/login", data={"token": token, "csrf": form_csrf},
                             headers={"Origin": origin(client)}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    home = await client.get("/ui/")
    assert home.status == 200, await home.text()
    return csrf_of(await home.text())


def origin(client: TestClient) -> str:
    return f"http://{client.host}:{client.port}"


def run(coro) -> Any:
    return asyncio.run(coro)
