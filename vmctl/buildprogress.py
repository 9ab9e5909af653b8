"""``vmctl image build``: follow a build job of the agent with a live display of its steps.

The agent runs the build in the background (``image_build``); this polls
``image_build_status`` once a second. On a terminal the display is a rich Live on stderr
(steps with their durations, the current step with a spinner, the last log line);
otherwise one line per finished step on stderr; nothing with ``--quiet``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Group
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from .errors import CLIError, WaitTimeout
from .live import LiveDisplay, last_line


class BuildProgress(LiveDisplay):
    def __init__(self, image: str, *, enabled: bool = True, live: bool | None = None,
                 title: str | None = None) -> None:
        self.image = image
        self.title = title or f"building {image}"
        self.doc: dict[str, Any] = {}
        self.printed: set[str] = set()
        super().__init__(enabled=enabled, live=live)

    def update(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        if self._live is not None:
            self.refresh()
        elif self.enabled:
            for step in doc.get("steps", []):
                if step["state"] != "running" and step["name"] not in self.printed:
                    self.printed.add(step["name"])
                    self.console.print(f"{self.image}: {step['name']:<12} "
                                       f"{step['state']:<7} {step['seconds']:7.1f}s")

    def _render(self, final: bool = False) -> Any:
        doc = self.doc
        steps = {s["name"]: s for s in doc.get("steps", [])}
        table = Table.grid(padding=(0, 2))
        table.add_column(width=2)
        table.add_column()
        table.add_column(justify="right")
        for name in doc.get("all_steps") or list(steps):
            s = steps.get(name)
            if s is None:
                table.add_row(" ", f"[dim]{name}[/]", "")
            elif s["state"] == "running" and not final:
                table.add_row(Spinner("dots"), f"[bold]{name}[/]", f"{s['seconds']:.1f}s")
            elif s["state"] == "failed" or s["state"] == "running":
                table.add_row("[red]✗[/]", f"[red]{name}[/]", f"{s['seconds']:.1f}s")
            else:
                table.add_row("[green]✓[/]", name, f"{s['seconds']:.1f}s")
        total = f"  {doc.get('seconds', 0):.0f}s" if doc else ""
        done = (doc.get("progress") or {}).get("done")
        if done is not None:
            whole = (doc.get("progress") or {}).get("total")
            total += f"  {done / (1 << 20):.1f}" + (
                f" of {whole / (1 << 20):.1f} MiB" if whole else " MiB")
        parts: list[Any] = [Text(f"{self.title}{total}", style="bold"), table]
        line = last_line(doc.get("log_tail") or "")
        if line and not final:
            parts.append(Text(f"  {line}", style="dim", overflow="ellipsis", no_wrap=True))
        return Group(*parts)


def follow(call: Callable[..., dict], image: str, progress: BuildProgress, *,
           timeout: float, poll: float = 1.0, op: str = "image_build_status",
           what: str = "build", again: str = "vmctl image build") -> dict:
    """Poll the job of ``image`` (``op``: its status operation) until it ends; return
    its last status, or raise an error naming the step (and, for builds, ending with
    the tail of the log)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = call(op, image=image)
        progress.update(doc)
        if doc.get("state") == "done":
            return doc
        if doc.get("state") in ("failed", "cancelled"):
            tail = (doc.get("log_tail") or "").rstrip()
            log = (f"\n--- last lines of {doc.get('log')} ---\n{tail}"
                   if doc.get("log") else "")
            raise CLIError(f"{what} of {image} {doc.get('state')} at step "
                           f"{doc.get('failed_step')}: {doc.get('error')}{log}",
                           "build_failed" if what == "build" else "image_error",
                           details={what: doc})
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"the {what} of {image} did not finish within {timeout:g}s "
                              f"(now at step {doc.get('step')}); it goes on: follow it "
                              f"again with '{again} {image}'")
        time.sleep(poll)
