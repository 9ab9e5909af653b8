"""The web UI at ``/ui/`` (on the agent's TCP listener): pages, the JSON its scripts
poll, the console and screen websockets, sign-in and sign-out.

The UI is a client of the dispatcher: every page and every button calls operations of
the table with the signed-in person's :class:`~vmagent.context.RequestContext`
(transport ``web``), through the same guards as the API (audit, permissions, the VM
lock), so a browser sees and does exactly what its user may. What only the UI has is
here and in :mod:`vmagent.api.ui.sessions` (who is signed in) and
:mod:`vmagent.api.ui.security` (headers, origin, CSRF).
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any, Awaitable, Callable

from aiohttp import web

from vmagent.api.activity import Activity
from vmagent.api.dispatch import Dispatcher
from vmagent.api.links import LinkTokens
from vmagent.api.server import pipe
from vmagent.api.ui import forms, html, views
from vmagent.api.ui.assets import Assets
from vmagent.api.ui.security import (CONSOLE_CSP, check_csrf, check_origin,
                                     headers_middleware)
from vmagent.api.ui.sessions import COOKIE, CSRF_COOKIE, Session, SessionStore, random_token
from vmagent.context import Caller, RequestContext, Transport
from vmagent.errors import (BadRequest, Forbidden, InternalError, NotFound, Unauthorized,
                            VMAgentError)
from vmagent.ops import BY_NAME

log = logging.getLogger(__name__)

PREFIX = "/ui"
SESSION_KEY: Any = (web.RequestKey("vmagent.ui.session", object)  # type: ignore[attr-defined]
                    if hasattr(web, "RequestKey") else "vmagent.ui.session")
# the operations of a VM page's buttons (the no-script form posts one of these)
PAGE_OPS = ("start", "shutdown", "reboot", "reset", "poweroff", "snapshot", "delete")
EVENTS_SHOWN = 50


def redirect(to: str) -> web.Response:
    """303 See Other: after a form, the browser GETs the next page."""
    return web.Response(status=303, headers={"Location": to})


def _is_api(request: web.Request) -> bool:
    return request.path.startswith(PREFIX + "/api/")


class WebUI:
    def __init__(self, dispatcher: Dispatcher, links: LinkTokens, activity: Activity, *,
                 identify: Callable[[str], Caller | None],
                 still_valid: Callable[[Caller], bool], assets: Assets,
                 tls: bool = False, sessions: SessionStore | None = None) -> None:
        self.dispatcher = dispatcher
        self.links = links
        self.activity = activity
        self.identify = identify
        self.still_valid = still_valid
        self.assets = assets
        self.tls = tls
        self.sessions = sessions or SessionStore()
        self.hostname = socket.gethostname()

    # --- the app ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[headers_middleware, self._errors])
        r = app.router
        r.add_get("/", self.list_page)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/link/{token}", self.link)
        r.add_get("/new", self.new_page)
        r.add_post("/new", self.new_submit)
        r.add_get("/vms/{name}", self.vm_page)
        r.add_post("/vms/{name}/op", self.vm_op)
        r.add_get("/vms/{name}/console", self.console_page)
        r.add_get("/vms/{name}/console.ws", self.console_ws)
        r.add_get("/vms/{name}/vnc", self.vnc_page)
        r.add_get("/vms/{name}/vnc.ws", self.vnc_ws)
        r.add_get("/api/vms", self.api_list)
        r.add_get("/api/vms/{name}", self.api_vm)
        r.add_post("/api/create", self.api_create)
        r.add_route("*", "/api/op/{op}", self.api_op)
        self.assets.routes(app)
        r.add_route("*", "/{tail:.*}", self.not_found)
        return app

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        self._session(request)
        raise NotFound(f"no such page: {request.path[:100]}")

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except VMAgentError as e:
            if e.status >= 500:
                log.error("%s %s: %s", request.method, request.path, e.message)
            return self._error(request, e)
        except web.HTTPException as e:
            if e.status in (404, 405):
                err = NotFound(f"no such page: {request.path}") if e.status == 404 else \
                    BadRequest(f"method {request.method} is not allowed on {request.path}")
                resp = self._error(request, err)
                resp.set_status(e.status)
                return resp
            raise
        except Exception as e:  # noqa: BLE001 - a bug: a page that says so, logged
            log.exception("%s %s failed", request.method, request.path)
            return self._error(request, InternalError(f"internal error: "
                                                      f"{type(e).__name__}: {e}"))

    def _error(self, request: web.Request, err: VMAgentError) -> web.Response:
        if _is_api(request):
            return web.json_response(err.to_json(), status=err.status)
        session = request.get(SESSION_KEY)
        if err.status == 401 and request.method == "GET" and \
                not request.path.startswith(PREFIX + "/link/"):
            return self._login_form(request, next_url=request.path_qs, error=err.message,
                                    status=401)
        return web.Response(text=html.error(err.status, err.message, session),
                            status=err.status, content_type="text/html")

    # --- sessions -----------------------------------------------------------------------

    def _session(self, request: web.Request) -> Session | None:
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is not None and not self.still_valid(session.caller):
            self.sessions.drop(session.id)      # its token was revoked
            session = None
        request[SESSION_KEY] = session
        return session

    def need(self, request: web.Request, vm: str | None = None,
             vnc: bool = False) -> Session:
        """The signed-in session (401 without one); a session scoped to one VM's screen
        may open only that (403)."""
        session = self._session(request)
        if session is None:
            raise Unauthorized("sign in first (with a token, or a link from 'vmctl ui')")
        if not session.allows(vm, vnc):
            raise Forbidden(f"this browser was signed in by a link for the screen of VM "
                            f"{session.vnc_only} only; sign in with 'vmctl ui' for more",
                            user=session.caller.user)
        return session

    def ctx(self, session: Session) -> RequestContext:
        return RequestContext(session.caller, Transport.WEB)

    async def call(self, session: Session, op: str, **params: Any) -> Any:
        return await self.dispatcher.call(op, self.ctx(session), params)

    def _cookie(self, resp: web.StreamResponse, name: str, value: str,
                max_age: int | None = None) -> None:
        resp.set_cookie(name, value, path=PREFIX, httponly=True, samesite="Strict",
                        secure=self.tls, max_age=max_age)

    def _signed_in(self, request: web.Request, caller: Caller, to: str,
                   vnc_only: str | None = None) -> web.Response:
        self.sessions.drop(request.cookies.get(COOKIE))     # never reuse an old id
        session = self.sessions.create(caller, vnc_only)
        resp = redirect(to)
        self._cookie(resp, COOKIE, session.id)
        resp.del_cookie(CSRF_COOKIE, path=PREFIX)
        log.info("web UI: %s (%s) signed in%s", caller.user, caller.role.value,
                 f" for the screen of {vnc_only}" if vnc_only else "")
        return resp

    # --- sign in and out ----------------------------------------------------------------

    def _login_form(self, request: web.Request, next_url: str = "/ui/",
                    error: str | None = None, status: int = 200) -> web.Response:
        csrf = request.cookies.get(CSRF_COOKIE) or random_token()
        resp = web.Response(text=html.login(csrf, forms.safe_next(next_url), error),
                            status=status, content_type="text/html")
        self._cookie(resp, CSRF_COOKIE, csrf)
        return resp

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        if session is not None and session.vnc_only is None:
            return redirect(PREFIX + "/")
        return self._login_form(request)

    async def login(self, request: web.Request) -> web.StreamResponse:
        await check_csrf(request, request.cookies.get(CSRF_COOKIE))
        form = await request.post()
        caller = self.identify(forms.text(form, "token"))
        if caller is None:
            return self._login_form(request, forms.text(form, "next"),
                                    "that token is not valid (or was revoked)", status=401)
        return self._signed_in(request, caller, forms.safe_next(form.get("next")))

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = self.need(request)
        await check_csrf(request, session.csrf)
        self.sessions.drop(session.id)
        resp = redirect(PREFIX + "/login")
        resp.del_cookie(COOKIE, path=PREFIX)
        return resp

    async def link(self, request: web.Request) -> web.StreamResponse:
        link = self.links.redeem(request.match_info["token"])
        if link.kind == "vnc":
            current = self._session(request)
            to = f"{PREFIX}/vms/{link.vm}/vnc"
            if current is not None and current.vnc_only is None and \
                    current.caller == link.caller:
                return redirect(to)          # already signed in as them
            return self._signed_in(request, link.caller, to, vnc_only=link.vm)
        return self._signed_in(request, link.caller, PREFIX + "/")

    # --- pages --------------------------------------------------------------------------

    def _page(self, text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html")

    async def _rows(self, session: Session) -> list[dict]:
        doc = await self.call(session, "list")
        return [views.row(st, self.activity.of(st["name"])) for st in doc["vms"]]

    async def list_page(self, request: web.Request) -> web.StreamResponse:
        session = self.need(request)
        host = await self.call(session, "host")
        host = {**host, "hostname": self.hostname,
                "accel": (host.get("accel") or {}).get("name")}
        return self._page(html.vm_list(session, await self._rows(session), host))

    async def _vm(self, session: Session, name: str) -> dict[str, Any]:
        st = await self.call(session, "status", name=name)
        row = views.row(st, self.activity.of(name))
        events = (await self.call(session, "events", name=name,
                                  limit=EVENTS_SHOWN))["events"]
        try:
            snaps, why = (await self.call(session, "snapshots", name=name))["snapshots"], None
        except VMAgentError as e:
            snaps, why = None, f"snapshots cannot be listed now: {e.message}"
        return {"status": st, "row": row, "events": events, "snapshots": snaps, "why": why}

    async def vm_page(self, request: web.Request) -> web.StreamResponse:
        session = self.need(request)
        v = await self._vm(session, request.match_info["name"])
        return self._page(html.vm_page(session, v["status"], v["row"], v["events"],
                                       v["snapshots"], v["why"]))

    async def _choices(self, session: Session) -> tuple[list[str], list[str]]:
        images = (await self.call(session, "image_list")).get("images", [])
        templates = (await self.call(session, "template_list")).get("templates", [])
        return ([i["name"] for i in images if i.get("name")],
                [t["name"] for t in templates if t.get("name") and
                 t.get("state", "ready") == "ready"])

    async def new_page(self, request: web.Request) -> web.StreamResponse:
        session = self.need(request)
        images, templates = await self._choices(session)
        return self._page(html.new_vm(session, images, templates))

    async def new_submit(self, request: web.Request) -> web.StreamResponse:
        """The create form without scripts: create, then the VM's page."""
        session = self.need(request)
        await check_csrf(request, session.csrf)
        form = await request.post()
        try:
            st = await self.call(session, "create", **forms.create_params(form))
        except VMAgentError as e:
            images, templates = await self._choices(session)
            values = {k: v for k, v in form.items() if isinstance(v, str)}
            return self._page(html.new_vm(session, images, templates, values, e.message),
                              status=e.status)
        return redirect(f"{PREFIX}/vms/{st['name']}")

    async def vm_op(self, request: web.Request) -> web.StreamResponse:
        """A VM page's button without scripts: run it, then back to the page."""
        session = self.need(request)
        await check_csrf(request, session.csrf)
        form = await request.post()
        name, op = request.match_info["name"], forms.text(form, "op")
        if op not in PAGE_OPS:
            raise BadRequest(f"op: one of {', '.join(PAGE_OPS)}")
        params: dict[str, Any] = {}
        if op == "delete" and forms.text(form, "confirm") != "yes":
            raise BadRequest(f"delete: tick the box that confirms deleting {name}")
        if op == "snapshot" and forms.text(form, "snapshot"):
            params["snapshot"] = forms.text(form, "snapshot")
        await self.call(session, op, name=name, **params)
        return redirect(PREFIX + "/" if op == "delete" else f"{PREFIX}/vms/{name}")

    async def console_page(self, request: web.Request) -> web.StreamResponse:
        session = self.need(request)
        name = request.match_info["name"]
        await self.call(session, "status", name=name)        # 403 / 404 like the API
        if why := self.assets.missing("xterm"):
            return self._page(html.error(503, why, session), status=503)
        resp = self._page(html.console(session, name))
        resp.headers["Content-Security-Policy"] = CONSOLE_CSP
        return resp

    async def vnc_page(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        session = self.need(request, vm=name, vnc=True)
        await self.call(session, "status", name=name)
        if why := self.assets.missing("novnc"):
            return self._page(html.error(503, why, session), status=503)
        return self._page(html.vnc(session, name))

    # --- websockets ---------------------------------------------------------------------

    async def _stream(self, request: web.Request, op: str, vnc: bool) -> web.WebSocketResponse:
        """Upgrade, then pipe the operation's stream; a refusal closes the websocket with
        4000 + the HTTP status and the message (a page can show why)."""
        ws = web.WebSocketResponse(heartbeat=30, protocols=("binary",))
        name = request.match_info["name"]
        try:
            check_origin(request)
            session = self.need(request, vm=name, vnc=vnc)
            stream = await self.call(session, op, name=name)
        except VMAgentError as e:
            await ws.prepare(request)
            await ws.close(code=4000 + e.status, message=e.message[:120].encode())
            return ws
        await ws.prepare(request)
        await pipe(ws, stream)
        return ws

    async def console_ws(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, "console", vnc=False)

    async def vnc_ws(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, "vnc", vnc=True)

    # --- what the scripts fetch ---------------------------------------------------------

    async def api_list(self, request: web.Request) -> web.StreamResponse:
        session = self.need(request)
        items = await self._rows(session)
        return web.json_response({"vms": items, "html": html.rows(items)})

    async def api_vm(self, request: web.Request) -> web.StreamResponse:
        session = self.need(request)
        v = await self._vm(session, request.match_info["name"])
        st = v["status"]
        return web.json_response({
            "status": st, "row": v["row"], "phases": views.phases(st),
            "html": {"status": html.status_fragment(st, v["row"]),
                     "spec": html.spec_fragment(st.get("spec") or {}),
                     "events": html.events_fragment(v["events"]),
                     "snapshots": html.snapshots_fragment(v["snapshots"], v["why"])}})

    async def api_create(self, request: web.Request) -> web.StreamResponse:
        session = self.need(request)
        await check_csrf(request, session.csrf)
        form = await request.post()
        st = await self.call(session, "create", **forms.create_params(form))
        return web.json_response(st, status=201)

    async def api_op(self, request: web.Request) -> web.StreamResponse:
        """Any operation of the table but the streams, with the session's caller: GET
        for those that read, POST (with the CSRF token) for those that change."""
        session = self.need(request)
        op = BY_NAME.get(request.match_info["op"])
        if op is None or op.websocket:
            raise NotFound(f"no such operation: {request.match_info['op'][:40]}")
        want = "POST" if op.mutates else "GET"
        if request.method != want:
            err = BadRequest(f"{op.name}: use {want}")
            return web.json_response(err.to_json(), status=405)
        if op.mutates:
            await check_csrf(request, session.csrf)
            params = await _json_body(request)
        else:
            params = dict(request.query)
        unknown = sorted(set(params) - set(op.params) - set(op.path_params))
        if unknown:
            raise BadRequest(f"{op.name}: unknown parameter(s): {', '.join(unknown)}")
        result = await self.dispatcher.call(op, self.ctx(session), params)
        return web.json_response(result, status=201 if op.created else 200)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body
