"""A VM's serial console log (qemu's chardev ``logfile``, appended to across boots).

The one reader of ``console.log``: the ``console_log`` operation, boot progress, the
power-down check, error messages and build steps all read it through here.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmagent.fsutil import atomic_write

READ_MAX = 1 << 20          # one read of the console_log operation
TRIM_LIMIT = 8 << 20        # the log is cut before a start once it is over this...
TRIM_KEEP = 1 << 20         # ...to its last bytes


class ConsoleLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def read(self, offset: int = 0, limit: int = READ_MAX) -> bytes:
        """Up to ``limit`` bytes from ``offset`` on (nothing if there is no log)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, offset))
                return f.read(limit)
        except OSError:
            return b""

    def tail(self, n: int) -> bytes:
        """The last ``n`` bytes."""
        return self.read(max(0, self.size() - n), n)

    def tail_text(self, n: int = 400) -> str:
        """The last ``n`` bytes as text for a message (no carriage returns)."""
        if not self.path.exists():
            return "(no console log)"
        return self.tail(n).decode("utf-8", "replace").strip().replace("\r", "")

    def append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)

    def trim(self, limit: int = TRIM_LIMIT, keep: int = TRIM_KEEP) -> None:
        """Cut the log to its last ``keep`` bytes once it is over ``limit``. Only while
        qemu is not running (it is the writer)."""
        if self.size() <= limit:
            return
        with open(self.path, "rb") as f:
            f.seek(-keep, os.SEEK_END)
            tail = f.read()
        atomic_write(self.path, tail)
