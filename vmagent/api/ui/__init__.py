"""The web UI: pages, sessions, CSRF, the browser consoles (noVNC, xterm.js) and their
static files, mounted at ``/ui/`` on the agent's TCP listener (docs/browser.md)."""

from __future__ import annotations

import socket

# the package itself imports none of its modules (they import it: no cycle); the
# wiring (vmagent/serve.py) takes WebUI from .routes and Assets from .assets


def browser_url(host: str, port: int, tls: bool) -> str:
    """Where a browser reaches a listener bound to ``host:port``: a wildcard address is
    reached by the host's name."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"
