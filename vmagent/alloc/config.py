"""The agent's config file (``vmagent serve --config /etc/vmagent/agent.toml``): what
this host is called, which segments it serves, what it offers and keeps for itself,
the defaults of a request, where the VMs' cgroups go and which GPUs it passes through.

```toml
name = "host-a"                  # in refusals and placement (default: the hostname)
segments = ["dev", "default"]    # default: dev and default, and gpu-dev with GPUs

[capacity]
cpus = 16                        # cores offered (default: the host's)
memory = "64G"                   # RAM offered (default: MemTotal)
reserve_cpus = 0.5               # kept for the host itself (default 0.5)
reserve_memory = "1G"            # (default 1G)
qemu_overhead = "512M"           # qemu's own memory beyond guest RAM (default: the
                                 # measured 256M, + 256M of translated code under TCG)

[defaults]                       # for what a request leaves out
image = "debian-12"
cpus = 2
memory = "2G"
disk = "10G"
segment = "dev"
cpu_guarantee = 0                # cores (0: nothing promised)

[cgroup]
mode = "auto"                    # auto | v1 | v2 | none
root = "/sys/fs/cgroup"
parent = "vmagent"               # VMs go in ROOT[/CONTROLLER]/PARENT/NAME

[[gpu]]
address = "0000:65:00.0"         # a PCI device bound to vfio-pci
label = "A40"                    # optional, shown in the host report

[monitor]                        # the 1 Hz checks and healing (docs/monitoring.md)
interval = 1.0                   # seconds between checks of a VM
link_timeout = 1.0               # the guest agent answers a ping within this
net_timeout = 1.0                # sshd greets within this
qmp_timeout = 10.0               # QMP unanswered this long: broken
link_down_warning = 30.0         # the link down this long while qemu runs: a warning
restart_backoff = 1.0            # first restart delay; doubles with each recent restart
restart_backoff_max = 60.0
crash_loop_restarts = 5          # this many restarts within crash_loop_window seconds,
crash_loop_window = 600.0        # then it stays broken ("crash loop")
```

Every key is optional; an unknown key, a wrong type or a bad value is an error naming
the file, the key and what is expected (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmagent.errors import BadRequest
from vmagent.spec import SEGMENTS, Defaults, check_image_name, parse_size

DEFAULT_PATH = Path("/etc/vmagent/agent.toml")
PCI_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
CGROUP_MODES = ("auto", "v1", "v2", "none")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Capacity:
    cpus: float | None = None           # None: the host's cores
    memory: int | None = None           # None: MemTotal
    reserve_cpus: float = 0.5
    reserve_memory: int = 1 << 30
    qemu_overhead: int | None = None    # None: measured, by accelerator (sizing.py)


@dataclass(frozen=True)
class CgroupConfig:
    mode: str = "auto"
    root: Path = Path("/sys/fs/cgroup")
    parent: str | None = None           # None: "vmagent" (another state dir: its own)


@dataclass(frozen=True)
class GPU:
    address: str
    label: str = ""


@dataclass(frozen=True)
class MonitorConfig:
    interval: float = 1.0
    link_timeout: float = 1.0
    net_timeout: float = 1.0
    qmp_timeout: float = 10.0
    link_down_warning: float = 30.0
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    crash_loop_restarts: int = 5
    crash_loop_window: float = 600.0


MONITOR_KEYS = tuple(f.name for f in dataclasses.fields(MonitorConfig))


@dataclass(frozen=True)
class AgentConfig:
    name: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    segments: tuple[str, ...] | None = None     # None: dev, default (+ gpu-dev w/ GPUs)
    capacity: Capacity = field(default_factory=Capacity)
    defaults: Defaults = field(default_factory=Defaults)
    cpu_guarantee: float = 0.0                  # the default guarantee
    cgroup: CgroupConfig = field(default_factory=CgroupConfig)
    gpus: tuple[GPU, ...] = ()
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    path: Path | None = None

    @property
    def served(self) -> tuple[str, ...]:
        if self.segments is not None:
            return self.segments
        return ("dev", "default") + (("gpu-dev",) if self.gpus else ())


def load(path: str | Path | None) -> AgentConfig:
    """The config at ``path``; None: ``$VMAGENT_CONFIG``, else /etc/vmagent/agent.toml if
    it exists, else the built-in defaults."""
    if path is None:
        env = os.environ.get("VMAGENT_CONFIG")
        if env:
            path = env
        elif DEFAULT_PATH.exists():
            path = DEFAULT_PATH
        else:
            return AgentConfig()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it: {e.strerror}") from None
    return parse(text, path)


def parse(text: str, path: Path) -> AgentConfig:
    import tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    r = _Reader(path)
    r.known(data, "", {"name", "segments", "capacity", "defaults", "cgroup", "gpu",
                      "monitor"})
    kw: dict[str, Any] = {"path": path}
    if "name" in data:
        name = r.typed(data, "name", str)
        if not NAME_RE.fullmatch(name):
            raise r.error("name", f"{name!r} is not a host name (letters, digits, "
                          "'.', '_', '-')")
        kw["name"] = name
    if "segments" in data:
        segs = r.typed(data, "segments", list)
        bad = [s for s in segs if s not in SEGMENTS]
        if bad or not segs:
            raise r.error("segments", f"expected a list of {', '.join(SEGMENTS)}; got "
                          f"{segs!r}")
        kw["segments"] = tuple(dict.fromkeys(segs))
    cap = r.table(data, "capacity", {"cpus", "memory", "reserve_cpus", "reserve_memory",
                                     "qemu_overhead"})
    ckw: dict[str, Any] = {}
    for key in ("cpus", "reserve_cpus"):
        if key in cap:
            ckw[key] = r.number(cap, key, "capacity.", 0 if "reserve" in key else 0.01)
    for key in ("memory", "reserve_memory", "qemu_overhead"):
        if key in cap:
            ckw[key] = r.size(cap, key, "capacity.")
    kw["capacity"] = Capacity(**ckw)
    d = r.table(data, "defaults", {"image", "cpus", "memory", "disk", "segment",
                                   "cpu_guarantee"})
    dkw: dict[str, Any] = {}
    if "image" in d:
        dkw["image"] = r.checked("defaults.image", check_image_name, d["image"])
    if "cpus" in d:
        dkw["cpus"] = int(r.number(d, "cpus", "defaults.", 1, integer=True))
    for key in ("memory", "disk"):
        if key in d:
            dkw[key] = r.size(d, key, "defaults.")
    if "segment" in d:
        if d["segment"] not in SEGMENTS:
            raise r.error("defaults.segment", f"expected one of {', '.join(SEGMENTS)}")
        dkw["segment"] = d["segment"]
    kw["defaults"] = Defaults(**dkw)
    if "cpu_guarantee" in d:
        kw["cpu_guarantee"] = r.number(d, "cpu_guarantee", "defaults.", 0)
    cg = r.table(data, "cgroup", {"mode", "root", "parent"})
    gkw: dict[str, Any] = {}
    if "mode" in cg:
        if cg["mode"] not in CGROUP_MODES:
            raise r.error("cgroup.mode", f"expected one of {', '.join(CGROUP_MODES)}")
        gkw["mode"] = cg["mode"]
    if "root" in cg:
        gkw["root"] = Path(r.typed(cg, "root", str, "cgroup."))
    if "parent" in cg:
        parent = r.typed(cg, "parent", str, "cgroup.").strip("/")
        if not parent or ".." in parent.split("/"):
            raise r.error("cgroup.parent", "expected a relative cgroup path such as "
                          "'vmagent' or 'machine.slice/vmagent'")
        gkw["parent"] = parent
    kw["cgroup"] = CgroupConfig(**gkw)
    gpus = data.get("gpu", [])
    if not isinstance(gpus, list):
        raise r.error("gpu", "expected [[gpu]] tables, each with an address")
    out = []
    for i, g in enumerate(gpus):
        where = f"gpu[{i}]."
        r.known(g, where, {"address", "label"})
        addr = r.typed(g, "address", str, where).lower()
        if len(addr) == 7:
            addr = "0000:" + addr            # 65:00.0 -> 0000:65:00.0
        if not PCI_RE.fullmatch(addr):
            raise r.error(where + "address", f"{g['address']!r} is not a PCI address "
                          "(like 0000:65:00.0)")
        if any(o.address == addr for o in out):
            raise r.error(where + "address", f"{addr} is listed twice")
        out.append(GPU(addr, str(g.get("label", ""))))
    kw["gpus"] = tuple(out)
    mon = r.table(data, "monitor", set(MONITOR_KEYS))
    mkw: dict[str, Any] = {}
    for key in MONITOR_KEYS:
        if key in mon:
            whole = key == "crash_loop_restarts"
            value = r.number(mon, key, "monitor.", 1 if whole else 0.01, integer=whole)
            mkw[key] = int(value) if whole else value
    kw["monitor"] = MonitorConfig(**mkw)
    return AgentConfig(**kw)


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"config file {self.path}: {key}: {problem}")

    def known(self, table: Any, where: str, keys: set[str]) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"config file {self.path}: {where.rstrip('.')}: expected a "
                              "table")
        unknown = sorted(set(table) - keys)
        if unknown:
            raise ConfigError(f"config file {self.path}: unknown key(s) "
                              f"{', '.join(where + k for k in unknown)} (known: "
                              f"{', '.join(sorted(keys))})")

    def table(self, data: dict, key: str, keys: set[str]) -> dict:
        table = data.get(key, {})
        self.known(table, key + ".", keys)
        return table

    def typed(self, table: dict, key: str, kind: type, where: str = "") -> Any:
        value = table[key]
        if not isinstance(value, kind):
            raise self.error(where + key, f"expected a {kind.__name__}, got {value!r}")
        return value

    def number(self, table: dict, key: str, where: str, lo: float,
               integer: bool = False) -> float:
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                integer and not isinstance(value, int)) or not value >= lo:
            raise self.error(where + key, f"expected a {'whole ' if integer else ''}number "
                             f">= {lo:g}, got {value!r}")
        return float(value)

    def size(self, table: dict, key: str, where: str) -> int:
        return self.checked(where + key, parse_size, table[key], where + key)

    def checked(self, key: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except BadRequest as e:
            raise self.error(key, e.message) from None
