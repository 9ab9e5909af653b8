"""Where the web UI's files are: its own (``static/`` beside this module) and the two
browser libraries it uses, which are dependencies installed by ``scripts/deps``, never
copies in this repository:

* noVNC: Debian's ``novnc`` package (``/usr/share/novnc``: the ES modules of ``core/``
  and ``vendor/``), or the npm ``@novnc/novnc`` package;
* xterm.js: the npm ``@xterm/xterm`` and ``@xterm/addon-fit`` packages, installed by
  ``scripts/deps`` from ``share/web/package.json`` (and its lock file) into
  ``/usr/local/share/vmagent/web``. (Debian 12's ``libjs-xterm`` ships an unbundled
  CommonJS stub that no browser can load.)

``--novnc-dir`` / ``--xterm-dir`` (or ``VMAGENT_NOVNC_DIR`` / ``VMAGENT_XTERM_DIR``)
point elsewhere. A library that is missing is said on the page that needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

APP_STATIC = Path(__file__).resolve().parent / "static"
WEB_DIR = Path("/usr/local/share/vmagent/web/node_modules")
NOVNC_DIRS = (Path("/usr/share/novnc"), WEB_DIR / "@novnc" / "novnc")
XTERM_DIRS = (WEB_DIR / "@xterm",)
# the xterm files the console page loads: URL name -> path under the @xterm directory
XTERM_FILES = {"xterm.js": "xterm/lib/xterm.js", "xterm.css": "xterm/css/xterm.css",
               "addon-fit.js": "addon-fit/lib/addon-fit.js"}
INSTALL_HINT = "run scripts/deps on the agent's host (it installs them)"


def _first(given: str | None, env: str, candidates: tuple[Path, ...],
           probe: str) -> Path | None:
    choice = given or os.environ.get(env)
    for d in ([Path(choice)] if choice else list(candidates)):
        if (d / probe).is_file():
            return d
    return None


@dataclass(frozen=True)
class Assets:
    novnc: Path | None      # has core/rfb.js
    xterm: Path | None      # has xterm/lib/xterm.js and addon-fit/lib/addon-fit.js

    @classmethod
    def find(cls, novnc_dir: str | None = None, xterm_dir: str | None = None) -> "Assets":
        xterm = _first(xterm_dir, "VMAGENT_XTERM_DIR", XTERM_DIRS, XTERM_FILES["xterm.js"])
        if xterm is not None and not all((xterm / f).is_file()
                                         for f in XTERM_FILES.values()):
            xterm = None
        return cls(_first(novnc_dir, "VMAGENT_NOVNC_DIR", NOVNC_DIRS, "core/rfb.js"), xterm)

    def missing(self, what: str) -> str | None:
        """Why the page needing ``what`` (novnc | xterm) cannot work, or None."""
        if what == "novnc" and self.novnc is None:
            return f"noVNC is not installed on this host ({INSTALL_HINT}: Debian's novnc)"
        if what == "xterm" and self.xterm is None:
            return f"xterm.js is not installed on this host ({INSTALL_HINT}: npm's " \
                "@xterm/xterm into /usr/local/share/vmagent/web)"
        return None

    def routes(self, app: web.Application) -> None:
        """Static routes under ``/static/`` of the UI app (mounted at ``/ui``)."""
        app.router.add_static("/static/app", APP_STATIC)
        if self.novnc is not None:
            for sub in ("core", "vendor"):
                if (self.novnc / sub).is_dir():
                    app.router.add_static(f"/static/novnc/{sub}", self.novnc / sub)
        if self.xterm is not None:
            for name, rel in XTERM_FILES.items():
                path = self.xterm / rel
                app.router.add_get(f"/static/xterm/{name}", _file(path))


def _file(path: Path):
    async def serve(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path, headers={"Cache-Control": "max-age=3600"})
    return serve
