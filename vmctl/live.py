"""A display on stderr that is a rich Live on a terminal and plain lines otherwise.

The base of the boot progress (:mod:`vmctl.progress`) and the build progress
(:mod:`vmctl.buildprogress`): subclasses draw themselves in ``_render(final)`` and call
:meth:`refresh` when something changed; when not live they print their own lines.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from rich.console import Console
from rich.live import Live

# terminal escapes and control characters of console or log lines shown in the display
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x00-\x08\x0b-\x1f\x7f]")


def last_line(text: str, width: int = 160) -> str:
    """The last non-empty line of ``text`` without escapes, cut to ``width``."""
    lines = [ln for ln in (ANSI.sub("", x).strip() for x in text.splitlines()) if ln]
    return lines[-1][:width] if lines else ""


class LiveDisplay:
    def __init__(self, *, enabled: bool = True, live: bool | None = None) -> None:
        self.enabled = enabled
        self.console = Console(file=sys.stderr, highlight=False)
        self.live_mode = enabled and (self.console.is_terminal if live is None else live)
        self._live: Live | None = None

    def _render(self, final: bool = False) -> Any:
        raise NotImplementedError

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def __enter__(self) -> "LiveDisplay":
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=8)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render(final=True))
            self._live.__exit__(*exc)
            self._live = None
