"""A VM's event log: state changes (and later restarts, operations) as JSON lines in
its run dir, bounded in size (the file is rotated once, to ``events.jsonl.1``)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from vmagent import rundir

log = logging.getLogger(__name__)

MAX_BYTES = 256 * 1024


class EventLog:
    def __init__(self, run_dir: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = Path(run_dir) / rundir.EVENTS
        self.max_bytes = max_bytes

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"time": time.time(), "type": kind, **fields}
        line = (json.dumps(event, sort_keys=True) + "\n").encode()
        try:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            with open(self.path, "ab") as f:
                f.write(line)
        except OSError as e:        # an event log must never fail an operation
            log.warning("%s: cannot write event %s: %s", self.path.parent.name, kind, e)
        return event

    def read(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The last ``limit`` events, oldest first (the rotated file included)."""
        events: list[dict[str, Any]] = []
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                lines = path.read_bytes().splitlines()
            except OSError:
                continue
            for ln in lines:
                try:
                    events.append(json.loads(ln))
                except ValueError:
                    continue            # a line torn by a crash
        return events[-limit:]
