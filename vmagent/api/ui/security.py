"""The web UI's response headers and request checks: a Content-Security-Policy that
allows only the agent's own scripts, styles and websockets; no framing, no referrer, no
caching of pages; and, for every request that changes something, the same origin and
the CSRF token (:mod:`vmagent.api.ui.sessions`)."""

from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import web

from vmagent.api.ui.sessions import CSRF_FIELD, CSRF_HEADER, same
from vmagent.errors import Forbidden

# 'self' covers the agent's own ws:/wss: URLs (CSP level 3). noVNC sets element styles
# from script (CSSOM), which style-src does not restrict.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
       "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# the console page: xterm.js writes <style> elements (its theme, the cell size), so
# that page alone allows inline styles; scripts stay the agent's own everywhere
CONSOLE_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",   # (no-referrer makes form posts send Origin: null)
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@web.middleware
async def headers_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                             ) -> web.StreamResponse:
    resp = await handler(request)
    if not resp.prepared:           # a websocket is already under way
        set_headers(request, resp)
    return resp


def set_headers(request: web.Request, resp: web.StreamResponse) -> None:
    for key, value in HEADERS.items():
        resp.headers.setdefault(key, value)
    if not request.path.startswith("/ui/static/"):
        resp.headers.setdefault("Cache-Control", "no-store")


def origin_of(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def check_origin(request: web.Request) -> None:
    """A state-changing request or a websocket must come from the UI's own pages: the
    Origin header (which browsers send with them) names this agent."""
    origin = request.headers.get("Origin")
    if origin is None:
        site = request.headers.get("Sec-Fetch-Site")
        if site not in (None, "same-origin", "none"):
            raise Forbidden(f"a request from another site ({site}) is refused")
        return
    if origin != origin_of(request):
        raise Forbidden(f"a request from another origin ({origin[:80]}) is refused")


async def csrf_given(request: web.Request) -> str | None:
    """The CSRF token a request carries: the header (scripts) or the form field."""
    token = request.headers.get(CSRF_HEADER)
    if token:
        return token
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def check_csrf(request: web.Request, expected: str | None) -> None:
    check_origin(request)
    if not same(await csrf_given(request), expected):
        raise Forbidden("the CSRF token is missing or wrong: reload the page and try "
                        "again", csrf=True)
