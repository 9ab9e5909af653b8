"""The HTTP API, built from ``ops.OPERATIONS``: one route per row, no other routes.

Errors are JSON ``{"error": code, "message": ...}`` with the status of the error class.
The unix-socket app trusts its callers (file mode 0660 decides who they are); the TCP
app requires ``Authorization: Bearer <token>`` on every request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import WSMsgType, web

from vmagent.qemu import argv as qargv
from vmagent.errors import BadRequest, Conflict, InternalError, NotFound, Unauthorized, VMAgentError
from vmagent.manager import Manager
from vmagent.ops import OPERATIONS, Operation
from vmagent.qemu.qmp import connect_unix
from vmagent.vms.store import State

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20


def _error(err: VMAgentError) -> web.Response:
    return web.json_response(err.to_json(), status=err.status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
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
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - a bug: report it as JSON, log the traceback
        log.exception("%s %s failed", request.method, request.path)
        return _error(InternalError(f"internal error: {type(e).__name__}: {e}"))


def token_middleware(token: str) -> Callable:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Callable) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _error(Unauthorized("a valid bearer token is required "
                                       "(Authorization: Bearer <token>)"))
        return await handler(request)

    return check


async def _params(request: web.Request, op: Operation) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if request.method in ("POST", "PUT", "DELETE") and request.can_read_body:
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY} bytes")
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise BadRequest(f"request body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise BadRequest("request body must be a JSON object")
            params.update(body)
    params.update(request.query)
    unknown = sorted(set(params) - set(op.params))
    if unknown:
        raise BadRequest(f"{op.name}: unknown parameter(s): {', '.join(unknown)}")
    for key in op.path_params:
        if key in params:
            raise BadRequest(f"{op.name}: {key} is given in the path")
        params[key] = request.match_info[key]
    return params


def _handler(manager: Manager, op: Operation) -> Callable[[web.Request], Awaitable]:
    method = getattr(manager, f"op_{op.name}")

    async def handle(request: web.Request) -> web.Response:
        params = await _params(request, op)
        if op.lock:
            name = params.get("name")
            if not isinstance(name, str):
                raise BadRequest("name is required")
            async with manager.locked(name):
                result = await method(**params)
        else:
            result = await method(**params)
        status = 201 if op.created and not result.get("dry_run") else 200
        return web.json_response(result, status=status)

    return handle


async def _pipe_ws(ws: web.WebSocketResponse, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
    """Bytes both ways between a websocket and a stream until either side closes."""
    async def down() -> None:
        while data := await reader.read(65536):
            await ws.send_bytes(data)

    async def up() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                writer.write(msg.data)
            elif msg.type == WSMsgType.TEXT:
                writer.write(msg.data.encode())
            else:
                break
            await writer.drain()

    tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        writer.close()
        await ws.close()


def _stream_handler(manager: Manager, op: Operation) -> Callable:
    async def handle(request: web.Request) -> web.StreamResponse:
        vm = manager.get(request.match_info["name"])
        if vm.rec.rt.state != State.RUNNING:
            raise Conflict(f"VM {vm.name} is {vm.rec.rt.state.value}; {op.name} needs it "
                           "running")
        try:
            if op.stream == "console":
                sock = connect_unix(vm.run_dir / qargv.CONSOLE_SOCK)
                reader, writer = await asyncio.open_unix_connection(sock=sock)
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1",
                                                               vm.rec.rt.ssh_port)
        except OSError as e:
            raise Conflict(f"{op.name} of {vm.name} is not reachable: {e}") from e
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        await _pipe_ws(ws, reader, writer)
        return ws

    return handle


def build_app(manager: Manager, token: str | None = None) -> web.Application:
    middlewares = [errors_middleware] + ([token_middleware(token)] if token else [])
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    for op in OPERATIONS:
        handler = _stream_handler(manager, op) if op.websocket else _handler(manager, op)
        app.router.add_route(op.method, op.url_path, handler, name=op.name)
    return app
