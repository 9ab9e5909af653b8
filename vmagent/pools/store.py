"""Pool definitions on disk: ``STATE_DIR/pools/P.json``, one versioned record per pool
written atomically; and the membership mark in a member's run dir."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmagent import rundir
from vmagent.errors import BadRequest, NotFound
from vmagent.fsutil import FormatError, atomic_write_json, read_record, write_record

log = logging.getLogger(__name__)

FORMAT = 1
POOL_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
MAX_SIZE = 64


def check_pool_name(value: Any) -> str:
    if not isinstance(value, str) or not POOL_RE.fullmatch(value):
        raise BadRequest(f"pool name {str(value)[:50]!r} is invalid: use 1-40 characters, "
                         "lowercase letters, digits and '-', starting with a letter")
    return value


def check_size(value: Any) -> int:
    if isinstance(value, bool):
        value = None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"size: expected a whole number of VMs, got {value!r}") from None
    if str(size) != str(value).strip() and not isinstance(value, int):
        raise BadRequest(f"size: expected a whole number of VMs, got {value!r}")
    if not 1 <= size <= MAX_SIZE:
        raise BadRequest(f"size: {size} is out of range (1..{MAX_SIZE})")
    return size


@dataclass
class PoolDef:
    name: str
    template: str
    size: int
    owner: str                # whose accounts the members are made with
    created: float = 0.0

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "PoolDef":
        return cls(name=check_pool_name(doc["name"]), template=str(doc["template"]),
                   size=check_size(doc["size"]), owner=str(doc["owner"]),
                   created=float(doc.get("created") or 0.0))


class PoolStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def load_all(self) -> dict[str, PoolDef]:
        pools: dict[str, PoolDef] = {}
        for path in sorted(self.root.glob("*.json")):
            try:
                pool = PoolDef.from_json(read_record(path, FORMAT))
            except (OSError, ValueError, KeyError, TypeError, FormatError,
                    BadRequest) as e:
                log.error("pool record %s is unreadable (left alone): %s", path, e)
                continue
            pools[pool.name] = pool
        return pools

    def save(self, pool: PoolDef) -> None:
        write_record(self.path(pool.name), asdict(pool), FORMAT, mode=0o600)

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            raise NotFound(f"no pool named {name!r}", pool=name) from None


# --- a member's mark ---------------------------------------------------------------------

def write_mark(run_dir: Path, pool: str, ready: bool) -> None:
    atomic_write_json(Path(run_dir) / rundir.POOL_MEMBER,
                      {"pool": pool, "ready": ready, "since": time.time()})


def read_mark(run_dir: Path) -> dict[str, Any] | None:
    """The member's mark (None: not a pool's member, or handed over)."""
    try:
        doc = json.loads((Path(run_dir) / rundir.POOL_MEMBER).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("pool"), str) else None


def clear_mark(run_dir: Path) -> None:
    (Path(run_dir) / rundir.POOL_MEMBER).unlink(missing_ok=True)
