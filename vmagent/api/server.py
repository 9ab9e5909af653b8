"""The HTTP API, built from ``vmagent/ops.py``: one route per row, no other routes.

A request becomes (operation, context, parameters) here and goes through the
dispatcher (:mod:`vmagent.api.dispatch`); a row with a ``stream`` answers with a
websocket piped to what its handler opened. Errors are JSON
``{"error": code, "message": ...}`` with the status of the error class. Who the caller
is comes from the listener's authenticator (:mod:`vmagent.api.auth`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import WSMsgType, web
from aiohttp.web_protocol import RequestHandler

from vmagent.api.auth import Authenticator
from vmagent.api.dispatch import Dispatcher
from vmagent.errors import (BadRequest, InternalError, NotFound, PayloadTooLarge,
                            VMAgentError)
from vmagent.ops import OPERATIONS, Operation
from vmagent.vms.streams import Stream

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
CONTEXT_KEY = "vmagent.context"
UI_PREFIX = "/ui"        # the web UI (api/ui/), mounted on the TCP listener


UI_KEY = web.AppKey("vmagent.ui", bool)


def _ui(request: web.Request) -> bool:
    """A request for the web UI (on an app that has one): the UI's own middlewares
    answer it (sessions instead of bearer tokens, HTML errors)."""
    path = request.path
    return bool(request.config_dict.get(UI_KEY)) and (
        path in ("/", UI_PREFIX) or path.startswith(UI_PREFIX + "/"))


def _error(err: VMAgentError) -> web.Response:
    return web.json_response(err.to_json(), status=err.status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    if _ui(request):                   # the web UI answers its own errors (HTML)
        return await handler(request)
    try:
        return await handler(request)
    except VMAgentError as e:
        if e.status >= 500:
            log.error("%s %s: %s", request.method, request.path, e.message)
        return _error(e)
    except web.HTTPException as e:
        if e.status == 404:
            return _error(NotFound(f"no such API route: {request.method} {request.path}"))
        if e.status == 405:
            err = BadRequest(f"method {request.method} is not allowed on {request.path}")
            return web.json_response(err.to_json(), status=405)
        if e.status == 413:
            return _error(PayloadTooLarge(f"request body over {MAX_BODY} bytes"))
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - a bug: report it as JSON, log the traceback
        log.exception("%s %s failed", request.method, request.path)
        return _error(InternalError(f"internal error: {type(e).__name__}: {e}"))


def auth_middleware(auth: Authenticator) -> Callable:
    @web.middleware
    async def identify(request: web.Request, handler: Callable) -> web.StreamResponse:
        if _ui(request):               # browsers sign in with a session (api/ui/)
            return await handler(request)
        request[CONTEXT_KEY] = auth.authenticate(request)
        return await handler(request)
    return identify


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of the body: all of it (``read`` waits for the whole body and
    enforces ``client_max_size``: 413 beyond it), nested at most as deep as the
    parser's stack allows (400, never 500)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as e:        # invalid JSON or invalid UTF-8
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


async def _params(request: web.Request, op: Operation) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if request.method in ("POST", "PUT", "DELETE") and request.can_read_body:
        params.update(await _body(request))
    params.update(request.query)
    unknown = sorted(set(params) - set(op.params))
    if unknown:
        raise BadRequest(f"{op.name}: unknown parameter(s): {', '.join(unknown)}")
    for key in op.path_params:
        if key in params:
            raise BadRequest(f"{op.name}: {key} is given in the path")
        params[key] = request.match_info[key]
    return params


def _handler(dispatcher: Dispatcher, op: Operation) -> Callable[[web.Request], Awaitable]:
    async def handle(request: web.Request) -> web.StreamResponse:
        params = await _params(request, op)
        result = await dispatcher.call(op, request[CONTEXT_KEY], params)
        if op.websocket:
            return await _websocket(request, result)
        if op.text:
            return web.Response(body=str(result).encode(),
                                headers={"Content-Type": op.content_type})
        status = 201 if op.created and not result.get("dry_run") else 200
        return web.json_response(result, status=status)

    return handle


async def _websocket(request: web.Request, stream: Stream) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    await pipe(ws, stream)
    return ws


async def pipe(ws: web.WebSocketResponse, stream: Stream) -> None:
    """Bytes both ways between a websocket and a stream until either side closes."""
    async def down() -> None:
        while data := await stream.reader.read(65536):
            await ws.send_bytes(data)

    async def up() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                stream.writer.write(msg.data)
            elif msg.type == WSMsgType.TEXT:
                stream.writer.write(msg.data.encode())
            else:
                break
            await stream.writer.drain()

    tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        stream.writer.close()
        await ws.close()


def build_app(dispatcher: Dispatcher, auth: Authenticator,
              ui: web.Application | None = None) -> web.Application:
    """The API app; with ``ui``, the web UI is mounted at ``/ui/`` (and ``/`` leads
    there)."""
    app = web.Application(middlewares=[errors_middleware, auth_middleware(auth)],
                          client_max_size=MAX_BODY)
    for op in OPERATIONS:
        app.router.add_route(op.method, op.url_path, _handler(dispatcher, op), name=op.name)
    if ui is not None:
        async def to_ui(request: web.Request) -> web.Response:
            return web.Response(status=303, headers={"Location": UI_PREFIX + "/"})
        app.router.add_get("/", to_ui)
        app.router.add_get(UI_PREFIX, to_ui)
        app.add_subapp(UI_PREFIX + "/", ui)
        app[UI_KEY] = True
    return app


class _JSONErrorHandler(RequestHandler):
    """Errors aiohttp answers before a request reaches the app (an oversized header, a
    malformed request line) are JSON like every other error."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)
        text = (message or getattr(exc, "message", None) or str(exc or "") or
                getattr(plain, "text", "") or "").strip().splitlines()
        err = (BadRequest if status < 500 else InternalError)(
            f"malformed request: {text[0][:200]}" if text else "malformed request")
        resp = web.json_response(err.to_json(), status=status)
        resp.force_close()
        return resp


class _JSONErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JSONErrorHandler(self, loop=self._loop, **self._kwargs)


class AgentRunner(web.AppRunner):
    """An AppRunner whose low-level errors are JSON too (see :class:`_JSONErrorHandler`)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JSONErrorServer
        return server
