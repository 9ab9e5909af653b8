"""The agent client: call an operation of ``vmagent/ops.py`` by name.

Requests are built from the operation table (method, path, parameters), never from
hand-written paths. Plain calls use ``http.client`` over a unix socket or TCP (with the
bearer token); an ``ssh://`` address is reached through a local socket forwarded over SSH
(:mod:`vmctl.sshtunnel`). Websocket operations (console, tunnel) use aiohttp.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlencode

from vmagent import ops

from .address import Address, Target
from .errors import AgentError, CLIError, Unreachable


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("vmagent", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


# an operation told to wait ``timeout`` seconds (shutdown, reboot, template_create) is
# waited for that long plus this, and never less than its row's timeout
TIMEOUT_MARGIN = 120.0


def wait_for(op_name: str, params: dict[str, Any]) -> float:
    """How long a client waits for an operation: its row's ``timeout`` in the table,
    or longer when the call gives the operation a longer ``timeout`` parameter."""
    op = ops.get(op_name)
    asked = params.get("timeout") if "timeout" in op.params else None
    if isinstance(asked, (int, float)) and not isinstance(asked, bool):
        return max(op.timeout, asked + TIMEOUT_MARGIN)
    return op.timeout


def tls_context() -> Any:
    """Certificates of https:// agents are checked against the system's CAs, or the CA
    file in ``$VMCTL_CA_FILE`` (for an agent with a certificate of a private CA)."""
    import os
    import ssl                     # late: only https:// addresses need it
    ca = os.environ.get("VMCTL_CA_FILE")
    try:
        return ssl.create_default_context(cafile=os.path.expanduser(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise CLIError(f"VMCTL_CA_FILE {ca}: {exc}", "bad_request") from None


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class AgentClient:
    """Calls operations on one agent. ``call`` returns the decoded JSON document."""

    def __init__(self, target: Target, *, timeout: float | None = None) -> None:
        self.target = target
        self.address: Address = target.address
        self.timeout = timeout
        self._tunnel = None

    # --- transport ----------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return self.address.is_local

    def _unix_path(self) -> str | None:
        """The unix socket to connect to (the local end of the SSH tunnel for ssh://)."""
        if self.address.scheme == "unix":
            return self.address.path
        if self.address.scheme == "ssh":
            if self._tunnel is None:
                from .sshtunnel import SSHTunnel
                self._tunnel = SSHTunnel(self.address)
            return self._tunnel.socket_path()
        return None

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        path = self._unix_path()
        if path is not None:
            return _UnixHTTPConnection(path, timeout)
        if self.address.scheme == "https":
            return http.client.HTTPSConnection(self.address.host, self.address.port,
                                               timeout=timeout, context=tls_context())
        return http.client.HTTPConnection(self.address.host, self.address.port,
                                          timeout=timeout)

    def headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": "vmctl"}
        if self.target.token:
            h["Authorization"] = f"Bearer {self.target.token}"
        return h

    def close(self) -> None:
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    # --- requests -----------------------------------------------------------------

    def request_for(self, op_name: str, params: dict[str, Any]) -> tuple[str, str, bytes | None]:
        """(method, path with query, body) for an operation, from the table."""
        op = ops.get(op_name)
        unknown = set(params) - set(op.params) - set(op.path_params)
        if unknown:
            raise ValueError(f"operation {op_name!r} takes no parameter(s) {sorted(unknown)}")
        path = op.render_path(params)
        rest = {k: v for k, v in params.items() if k not in op.path_params and v is not None}
        body = None
        if op.method == "GET":
            if rest:
                path += "?" + urlencode({k: _query_value(v) for k, v in rest.items()})
        elif rest or op.method == "POST":
            body = json.dumps(rest).encode()
        return op.method, path, body

    def call(self, op_name: str, *, call_timeout: float | None = None, **params: Any) -> dict:
        """Run one operation; raise :class:`AgentError` with the agent's code on failure.
        ``call_timeout`` bounds the HTTP exchange (``timeout`` is an operation parameter)."""
        method, path, body = self.request_for(op_name, params)
        timeout = call_timeout or self.timeout or wait_for(op_name, params)
        headers = self.headers()
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unreachable(self._unreachable(exc)) from None
        except PermissionError:
            raise Unreachable(f"permission denied connecting to {self.address}: add yourself "
                              "to the socket's group (or use sudo)") from None
        except (TimeoutError, socket.timeout):
            raise CLIError(f"the agent at {self.address} did not answer {op_name} within "
                           f"{timeout:g}s", "timeout") from None
        except (http.client.HTTPException, OSError) as exc:
            if exc.__class__.__name__.startswith("SSL"):      # ssl.SSLError and kin
                raise Unreachable(f"TLS with the agent at {self.address} failed: {exc} "
                                  "(a private CA's certificate goes in VMCTL_CA_FILE)") \
                    from None
            raise Unreachable(f"lost the connection to the agent at {self.address}: "
                              f"{exc.__class__.__name__}: {exc}") from None
        finally:
            conn.close()
        return self._decode(op_name, resp.status, raw)

    def _unreachable(self, exc: OSError) -> str:
        if self.address.scheme == "unix" and isinstance(exc, FileNotFoundError):
            return (f"no agent at {self.address} (the socket does not exist): start one with "
                    "'vmagent serve', or choose a host with --host / VMCTL_AGENT")
        return f"cannot reach the agent at {self.address}: {exc.strerror or exc}"

    def _decode(self, op_name: str, status: int, raw: bytes) -> dict:
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = None
        if status >= 400:
            if isinstance(doc, dict) and "error" in doc:
                message = doc.get("message") or doc["error"]
                if doc["error"] == "unauthorized":
                    message += (" (set token_file for this host in the config file, or "
                                "VMCTL_TOKEN_FILE)" if not self.target.token else
                                " (the token was refused)")
                raise AgentError(message, doc["error"], details=doc.get("details"),
                                 status=status)
            code = {401: "unauthorized", 404: "not_found", 409: "conflict",
                    504: "timeout"}.get(status, "internal")
            text = raw.decode(errors="replace").strip().splitlines()
            raise AgentError(f"{op_name}: HTTP {status} from the agent"
                             + (f": {text[0][:200]}" if text else ""), code, status=status)
        if not isinstance(doc, dict):
            raise CLIError(f"{op_name}: the agent answered HTTP {status} with something "
                           "that is not a JSON object", "internal")
        return doc

    # --- websockets ---------------------------------------------------------------

    async def websocket(self, op_name: str, **params: Any):
        """Open a websocket operation: returns ``(session, ws)``; close both after use."""
        import aiohttp
        op = ops.get(op_name)
        if not op.websocket:
            raise ValueError(f"{op_name} is not a websocket operation")
        method, path, _ = self.request_for(op_name, params)
        unix = self._unix_path()
        if unix is not None:
            connector = aiohttp.UnixConnector(path=unix)
            url = "http://vmagent" + path
        else:
            tls = tls_context() if self.address.scheme == "https" else False
            connector = aiohttp.TCPConnector(ssl=tls)
            url = f"{self.address.scheme}://{self.address.host}:{self.address.port}" + path
        session = aiohttp.ClientSession(connector=connector)
        try:
            ws = await session.ws_connect(url, headers=self.headers(), autoping=True,
                                          heartbeat=30, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            await session.close()
            code = {401: "unauthorized", 404: "not_found", 409: "conflict"}.get(
                exc.status, "internal")
            raise AgentError(f"{op_name}: the agent refused the connection (HTTP "
                             f"{exc.status} {exc.message})", code, status=exc.status) from None
        except (aiohttp.ClientConnectionError, OSError) as exc:
            await session.close()
            raise Unreachable(f"cannot reach the agent at {self.address}: {exc}") from None
        return session, ws
