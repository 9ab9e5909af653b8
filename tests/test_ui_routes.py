"""The web UI's routes in-process (tests/ui_helpers.py: a real dispatcher with the real
access guard, fake handlers): the 401/403 rules of every route, CSRF on every
state-changing request, the headers, the cookie, sign-in links."""

from __future__ import annotations

import pytest
from aiohttp import WSMsgType

from ui_helpers import csrf_of, origin, run, sign_in, ui_client
from vmagent.api.ui.security import CONSOLE_CSP, CSP
from vmagent.context import Transport

# every route of the UI app: (method, path pattern) -> how to reach it for VM {vm};
# a new route fails test_every_route_is_covered until it is listed here
ROUTES = {
    ("GET", "/ui/"): "page", ("GET", "/ui/login"): "public",
    ("POST", "/ui/login"): "public", ("POST", "/ui/logout"): "post",
    ("GET", "/ui/link/{token}"): "public", ("GET", "/ui/new"): "page",
    ("POST", "/ui/new"): "post", ("GET", "/ui/vms/{name}"): "vm-page",
    ("POST", "/ui/vms/{name}/op"): "vm-post", ("GET", "/ui/vms/{name}/console"): "vm-page",
    ("GET", "/ui/vms/{name}/console.ws"): "vm-ws", ("GET", "/ui/vms/{name}/vnc"): "vm-page",
    ("GET", "/ui/vms/{name}/vnc.ws"): "vm-ws", ("GET", "/ui/api/vms"): "api",
    ("GET", "/ui/api/vms/{name}"): "vm-api", ("POST", "/ui/api/create"): "post",
    ("*", "/ui/api/op/{op}"): "op", ("*", "/ui/{tail}"): "public",
}
VM_PATHS = {
    ("GET", "/ui/vms/{name}"): "/ui/vms/{vm}", ("POST", "/ui/vms/{name}/op"): "/ui/vms/{vm}/op",
    ("GET", "/ui/vms/{name}/console"): "/ui/vms/{vm}/console",
    ("GET", "/ui/vms/{name}/vnc"): "/ui/vms/{vm}/vnc",
    ("GET", "/ui/api/vms/{name}"): "/ui/api/vms/{vm}",
}


def _routes(ui) -> set[tuple[str, str]]:
    out = set()
    for r in ui.router.routes():
        info = r.resource.get_info()
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if path and not path.startswith("/static") and r.method != "HEAD":
            out.add((r.method, "/ui" + path.replace("{tail:.*}", "{tail}")))
    return out


def test_every_route_is_covered():
    from ui_helpers import FakeAgent
    assert _routes(FakeAgent().ui.app()) == set(ROUTES)


@pytest.mark.parametrize("route", sorted(r for r, k in ROUTES.items() if k != "public"))
def test_without_a_session_every_route_is_401(route):
    method, pattern = route

    async def go():
        async with ui_client() as (client, agent):
            path = pattern.replace("{name}", "a1").replace("{op}", "status")
            if path.endswith(".ws"):
                ws = await client.ws_connect(path, headers={"Origin": origin(client)})
                msg = await ws.receive()
                assert msg.type == WSMsgType.CLOSE and ws.close_code == 4401
                return
            resp = await client.request("GET" if method == "*" else method, path,
                                        headers={"Origin": origin(client)},
                                        allow_redirects=False)
            assert resp.status == 401, (path, resp.status)
            if "/api/" in path:
                assert (await resp.json())["error"] == "unauthorized"
            elif method == "GET":
                assert 'name="token"' in await resp.text()      # the sign-in form
            else:
                assert "sign in first" in await resp.text()
            assert agent.calls == []
    run(go())


@pytest.mark.parametrize("route", sorted(VM_PATHS))
def test_another_persons_vm_is_403_on_every_vm_route(route):
    async def go():
        async with ui_client() as (client, agent):
            csrf = await sign_in(client, "tok-alice")
            agent.calls.clear()
            path = VM_PATHS[route].format(vm="b1")
            if route[0] == "POST":
                resp = await client.post(path, data={"op": "reboot", "csrf": csrf},
                                         headers={"Origin": origin(client)},
                                         allow_redirects=False)
            else:
                resp = await client.get(path)
            assert resp.status == 403, (path, resp.status)
            text = await resp.text()
            assert "b1" in text and "alice" in text
            assert not [c for c in agent.calls if c[0] not in ("status",)]
            mine = await client.get(VM_PATHS[route].format(vm="a1")) if route[0] == "GET" \
                else None
            if mine is not None:
                assert mine.status in (200, 503)        # 503: noVNC/xterm not installed
    run(go())


def test_another_persons_vm_is_refused_on_the_websockets_and_the_op_endpoint():
    async def go():
        async with ui_client() as (client, agent):
            csrf = await sign_in(client, "tok-alice")
            for ws_path in ("/ui/vms/b1/console.ws", "/ui/vms/b1/vnc.ws"):
                ws = await client.ws_connect(ws_path, headers={"Origin": origin(client)})
                await ws.receive()
                assert ws.close_code == 4403
            for op in ("reboot", "delete", "vnc_link"):
                resp = await client.post(f"/ui/api/op/{op}", json={"name": "b1"},
                                         headers={"X-CSRF-Token": csrf,
                                                  "Origin": origin(client)})
                assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
            resp = await client.get("/ui/api/op/status?name=b1")
            assert resp.status == 403
            assert not [c for c in agent.calls if c[0] in ("reboot", "delete", "stream")]
    run(go())


def test_the_list_shows_only_the_callers_vms_and_operations_carry_their_context():
    async def go():
        async with ui_client() as (client, agent):
            await sign_in(client, "tok-bob")
            page = await (await client.get("/ui/")).text()
            # by its row: a bare "a1" can be part of a random token on the page
            assert 'data-vm="b1"' in page and 'data-vm="a1"' not in page
            assert "/ui/vms/a1" not in page
            doc = await (await client.get("/ui/api/vms")).json()
            assert [v["name"] for v in doc["vms"]] == ["b1"]
            assert 'data-vm="b1"' in doc["html"] and 'data-vm="a1"' not in doc["html"]
            op, ctx, _ = next(c for c in agent.calls if c[0] == "list")
            assert ctx.caller.user == "bob" and ctx.transport == Transport.WEB
    run(go())


STATE_CHANGING = [("/ui/api/op/reboot", {"json": {"name": "a1"}}),
                  ("/ui/api/create", {"data": {"name": "n1", "image": "test"}}),
                  ("/ui/new", {"data": {"name": "n1", "image": "test"}}),
                  ("/ui/vms/a1/op", {"data": {"op": "reboot"}}),
                  ("/ui/logout", {"data": {}})]


@pytest.mark.parametrize("path,body", STATE_CHANGING)
def test_a_state_changing_request_without_the_csrf_token_is_refused(path, body):
    async def go():
        async with ui_client() as (client, agent):
            csrf = await sign_in(client)
            before = len(agent.calls)
            for headers in ({"Origin": origin(client)},
                            {"Origin": origin(client), "X-CSRF-Token": "wrong"},
                            # the right token from another site
                            {"Origin": "http://evil.example", "X-CSRF-Token": csrf}):
                resp = await client.post(path, headers=headers, allow_redirects=False,
                                         **body)
                assert resp.status == 403, (path, headers, resp.status)
            assert len(agent.calls) == before          # nothing ran
            ok = await client.post(path, headers={"Origin": origin(client),
                                                  "X-CSRF-Token": csrf},
                                   allow_redirects=False, **body)
            assert ok.status in (200, 201, 303), (path, ok.status, await ok.text())
    run(go())


def test_sign_in_needs_the_forms_csrf_token_and_a_valid_token():
    async def go():
        async with ui_client() as (client, agent):
            page = await client.get("/ui/login")
            csrf = csrf_of(await page.text())
            no_csrf = await client.post("/ui/login", data={"token": "tok-alice"},
                                        headers={"Origin": origin(client)})
            assert no_csrf.status == 403
            bad = await client.post("/ui/login", data={"token": "nope", "csrf": csrf},
                                    headers={"Origin": origin(client)})
            assert bad.status == 401 and "not valid" in await bad.text()
            good = await client.post("/ui/login", data={"token": "tok-alice", "csrf": csrf,
                                                        "next": "https://evil.example/"},
                                     headers={"Origin": origin(client)},
                                     allow_redirects=False)
            assert good.status == 303 and good.headers["Location"] == "/ui/"
            cookie = good.headers.getall("Set-Cookie")
            session = next(c for c in cookie if c.startswith("vmagent_session="))
            assert "HttpOnly" in session and "SameSite=Strict" in session
            assert "Path=/ui" in session and "Secure" not in session
            assert "tok-alice" not in good.headers["Location"]
    run(go())


def test_with_tls_the_session_cookie_is_secure():
    async def go():
        async with ui_client(tls=True) as (client, agent):
            page = await client.get("/ui/login")
            assert "Secure" in page.headers["Set-Cookie"]
            csrf = csrf_of(await page.text())
            # (a client sends Secure cookies over TLS only: here, by hand)
            resp = await client.post("/ui/login", data={"token": "tok-alice", "csrf": csrf},
                                     headers={"Origin": origin(client),
                                              "Cookie": f"vmagent_csrf={csrf}"},
                                     allow_redirects=False)
            assert resp.status == 303
            assert "Secure" in next(c for c in resp.headers.getall("Set-Cookie")
                                    if c.startswith("vmagent_session="))
    run(go())


def test_headers_csp_on_pages_json_errors_and_the_console():
    async def go():
        async with ui_client() as (client, agent):
            login = await client.get("/ui/login")
            assert login.headers["Content-Security-Policy"] == CSP
            assert "script-src 'self';" in CSP and "unsafe" not in CSP
            assert "frame-ancestors 'none'" in CSP
            assert login.headers["X-Frame-Options"] == "DENY"
            assert login.headers["Cache-Control"] == "no-store"
            await sign_in(client)
            for path in ("/ui/", "/ui/api/vms", "/ui/vms/zz", "/ui/nothing-here"):
                resp = await client.get(path)
                assert resp.headers["Content-Security-Policy"] == CSP, path
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
            agent.ui.assets = type(agent.ui.assets)(novnc=None, xterm=__file__)
            console = await client.get("/ui/vms/a1/console")
            assert console.status == 200
            assert console.headers["Content-Security-Policy"] == CONSOLE_CSP
            assert "script-src 'self';" in CONSOLE_CSP
            static = await client.get("/ui/static/app/common.js")
            assert static.status == 200 and "no-store" not in static.headers.get(
                "Cache-Control", "")
    run(go())


def test_a_ui_link_signs_in_once_and_leaves_no_token_in_the_url():
    async def go():
        async with ui_client() as (client, agent):
            link = agent.links.tokens.issue("ui", agent.ui.identify("tok-bob"))
            resp = await client.get(f"/ui/link/{link}", allow_redirects=False)
            assert resp.status == 303 and resp.headers["Location"] == "/ui/"
            page = await client.get("/ui/")
            assert page.status == 200 and "bob" in await page.text()
            client.session.cookie_jar.clear()
            again = await client.get(f"/ui/link/{link}", allow_redirects=False)
            assert again.status == 401 and "already used" in await again.text()
    run(go())


def test_a_vnc_link_opens_that_vms_screen_and_nothing_else():
    async def go():
        async with ui_client() as (client, agent):
            link = agent.links.tokens.issue("vnc", agent.ui.identify("tok-alice"), "a1")
            resp = await client.get(f"/ui/link/{link}", allow_redirects=False)
            assert resp.headers["Location"] == "/ui/vms/a1/vnc"
            assert (await client.get("/ui/vms/a1/vnc")).status == 503   # no noVNC here
            ws = await client.ws_connect("/ui/vms/a1/vnc.ws", headers={"Origin": origin(client)})
            await ws.send_bytes(b"RFB 003.008\n")
            assert (await ws.receive_bytes()) == b"RFB 003.008\n"   # the echo stream
            await ws.close()
            for path in ("/ui/", "/ui/vms/a1", "/ui/vms/a1/console", "/ui/api/vms",
                         "/ui/vms/b1/vnc", "/ui/api/op/status?name=a1"):
                assert (await client.get(path)).status == 403, path
    run(go())


def test_an_expired_or_foreign_link_is_refused():
    async def go():
        async with ui_client() as (client, agent):
            tokens = agent.links.tokens
            link = tokens.issue("vnc", agent.ui.identify("tok-alice"), "a1", ttl=1)
            tokens.clock = lambda: 10 ** 12
            resp = await client.get(f"/ui/link/{link}")
            assert resp.status == 401 and "expired" in await resp.text()
            assert (await client.get("/ui/")).status == 401     # not signed in
    run(go())


def test_a_revoked_token_ends_its_sessions():
    async def go():
        async with ui_client() as (client, agent):
            await sign_in(client, "tok-alice")
            agent.revoked.add("ta")
            assert (await client.get("/ui/")).status == 401
    run(go())


def test_websocket_from_another_origin_is_refused():
    async def go():
        async with ui_client() as (client, agent):
            await sign_in(client)
            ws = await client.ws_connect("/ui/vms/a1/console.ws",
                                         headers={"Origin": "http://evil.example"})
            await ws.receive()
            assert ws.close_code == 4403
            ok = await client.ws_connect("/ui/vms/a1/console.ws",
                                         headers={"Origin": origin(client)})
            await ok.send_str("root\r")
            assert (await ok.receive_bytes()) == b"root\r"
            await ok.close()
    run(go())


def test_the_op_endpoint_keeps_reads_and_changes_apart():
    async def go():
        async with ui_client() as (client, agent):
            csrf = await sign_in(client)
            h = {"X-CSRF-Token": csrf, "Origin": origin(client)}
            assert (await client.get("/ui/api/op/reboot?name=a1")).status == 405
            assert (await client.post("/ui/api/op/status", json={"name": "a1"},
                                      headers=h)).status == 405
            assert (await client.get("/ui/api/op/console?name=a1")).status == 404
            assert (await client.get("/ui/api/op/nope")).status == 404
            bad = await client.post("/ui/api/op/reboot", json={"name": "a1", "x": 1},
                                    headers=h)
            assert bad.status == 400 and "unknown parameter" in (await bad.json())["message"]
            ok = await client.post("/ui/api/op/reboot", json={"name": "a1"}, headers=h)
            assert ok.status == 200
    run(go())


def test_delete_from_the_page_needs_its_confirmation():
    async def go():
        async with ui_client() as (client, agent):
            csrf = await sign_in(client)
            h = {"Origin": origin(client)}
            resp = await client.post("/ui/vms/a1/op", data={"op": "delete", "csrf": csrf},
                                     headers=h, allow_redirects=False)
            assert resp.status == 400 and "confirm" in await resp.text()
            assert not [c for c in agent.calls if c[0] == "delete"]
            resp = await client.post("/ui/vms/a1/op", data={"op": "delete", "csrf": csrf,
                                                            "confirm": "yes"},
                                     headers=h, allow_redirects=False)
            assert resp.status == 303 and resp.headers["Location"] == "/ui/"
            assert [c for c in agent.calls if c[0] == "delete"]
    run(go())


def test_the_create_form_keeps_what_was_typed_when_create_fails():
    async def go():
        async with ui_client() as (client, agent):
            csrf = await sign_in(client)
            resp = await client.post("/ui/new", data={"csrf": csrf, "name": "a1",
                                                      "source": "image", "image": "test",
                                                      "memory": "3G", "admins": "carol"},
                                     headers={"Origin": origin(client)})
            text = await resp.text()
            assert resp.status == 409 and "exists" in text
            assert 'value="3G"' in text and 'value="carol"' in text
    run(go())
