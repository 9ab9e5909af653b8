"""The declarative VM model: validation and the defaults phase (pure, no I/O)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from vmagent.errors import BadRequest

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
IMAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
SSH_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ssh-dss|ecdsa-sha2-nistp(256|384|521)|"
    r"sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/=]+( [^\r\n\x00]*)?$"
)
SEGMENTS = ("dev", "default", "gpu-dev")
# what the agent does when a VM breaks (vmagent/monitor/healing.py): never restart it,
# restart it when it failed (qemu died, the guest panicked, QMP hung), or also when the
# guest powered itself off; never a VM its owner stopped
RESTART_POLICIES = ("never", "on-failure", "always")
# the default by segment: service and CI VMs (segment default) come back by themselves
RESTART_DEFAULTS = {"default": "on-failure"}
RESERVED_USERS = frozenset({
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "systemd-network",
    "systemd-resolve", "messagebus", "sshd", "_apt", "systemd-timesync",
})
USER_DATA_MAX = 64 * 1024
# YAML aliases let a few hundred bytes expand to millions of values when the seed is
# rendered; no alias-free document of 64 KiB has more values than bytes.
USER_DATA_MAX_VALUES = USER_DATA_MAX
USER_DATA_MAX_DEPTH = 100
DEV_CPU_GUARANTEE_MAX = 2.0

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)

MIN_MEMORY = 128 << 20
MAX_MEMORY = 1 << 40
MIN_DISK = 1 << 30
MAX_DISK = 64 << 40
MAX_CPUS = 64
MAX_GPUS = 8


def parse_size(value: Any, what: str = "size") -> int:
    """Parse ``2G``, ``512M``, ``1.5G``, ``10GiB`` or an integer number of bytes."""
    if isinstance(value, bool):
        raise BadRequest(f"{what}: expected a size such as 2G or 512M, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise BadRequest(f"{what}: size must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            number, unit = m.groups()
            return int(float(number) * _UNITS[unit.upper()])
    raise BadRequest(f"{what}: cannot parse {value!r} as a size (examples: 2G, 512M, 20G)")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
MAX_TTL = 30 * 86400


def parse_duration(value: Any, what: str = "duration", maximum: int = MAX_TTL) -> int:
    """Whole seconds from ``2h``, ``90m``, ``1h30m``, ``45s``, ``1d``, ``3600`` (a bare
    number is seconds); more than 0 and at most ``maximum``."""
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().replace(" ", "")
        parts = _DURATION_RE.findall(text)
        if parts and "".join(n + u for n, u in parts).lower() == text.lower():
            seconds = sum(float(n) * _DURATION_UNITS[(u or "s").lower()] for n, u in parts)
    if seconds is None:
        raise BadRequest(f"{what}: cannot parse {str(value)[:40]!r} as a duration "
                         "(examples: 2h, 90m, 1h30m, 45s, 1d; a bare number is seconds)")
    if not 0 < seconds <= maximum:
        raise BadRequest(f"{what}: {format_duration(int(seconds))} is out of range "
                         f"(1s..{format_duration(maximum)})")
    return max(1, int(round(seconds)))


def format_duration(seconds: int) -> str:
    """``7200`` -> ``2h``, ``5400`` -> ``1h30m``, ``45`` -> ``45s``."""
    if seconds <= 0:
        return f"{seconds}s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out


def format_size(n: int) -> str:
    """The shortest exact K/M/G/T form of ``n`` bytes (``2147483648`` -> ``2G``)."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def parse_user_data(text: str) -> dict[str, Any]:
    """Validate extra cloud-config: YAML mapping, at most 64 KiB."""
    if not isinstance(text, str):
        raise BadRequest("user_data: expected cloud-config text")
    if len(text.encode()) > USER_DATA_MAX:
        raise BadRequest(f"user_data: {len(text.encode())} bytes is over the limit of 64 KiB")
    if "\x00" in text:
        raise BadRequest("user_data: contains a NUL byte")
    import yaml     # late: vmctl imports this module and most commands need no YAML
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise BadRequest("user_data: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadRequest(f"user_data: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadRequest("user_data: cloud-config must be a YAML mapping "
                         f"(got {type(data).__name__})")
    _check_expansion(data)
    return data


def _check_expansion(data: Any) -> None:
    """Refuse a document that expands (through aliases) or nests beyond what plain YAML
    of 64 KiB can hold: rendering it would stall the agent or exhaust its stack."""
    count, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > USER_DATA_MAX_VALUES:
            raise BadRequest(f"user_data: expands to more than {USER_DATA_MAX_VALUES} "
                             "values (YAML aliases?)")
        if depth > USER_DATA_MAX_DEPTH:
            raise BadRequest(f"user_data: nested more than {USER_DATA_MAX_DEPTH} levels "
                             "deep (or a recursive alias)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for item in value.items() for v in item)
        elif isinstance(value, (list, set)):
            stack.extend((v, depth + 1) for v in value)


def _check_name(value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"name: expected a string, got {type(value).__name__}")
    if not NAME_RE.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 70 else (
            f"{str(value)[:40]}... ({len(str(value))} characters)")
        raise BadRequest(
            f"name {shown!r} is invalid: use 1-63 characters, lowercase letters, digits and "
            "'-', starting with a letter")
    return value


def check_name(value: Any) -> str:
    """Validate a VM name (also used for path parameters)."""
    return _check_name(value)


def check_image_name(value: Any) -> str:
    if not isinstance(value, str) or not IMAGE_NAME_RE.fullmatch(value):
        raise BadRequest(f"image name {str(value)[:70]!r} is invalid: use 1-63 characters, "
                         "lowercase letters, digits, '.', '_' and '-'")
    return value


def _number(value: Any, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise BadRequest(f"{what}: expected a number, got {value!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{what}: {value} is out of range ({lo:g}..{hi:g})")
    return value



def _choice(value: Any, field_name: str, choices: tuple[str, ...] | list[str]) -> str:
    """One of ``choices``, else a 400 naming them."""
    if value not in choices:
        raise BadRequest(f"{field_name}: {str(value)[:40]!r} is not one of "
                         f"{', '.join(choices)}")
    return value

@dataclass
class VMSpec:
    """What a VM is. ``None`` fields are filled by :func:`apply_defaults`."""

    name: str
    image: str | None = None
    cpus: int | None = None
    memory: int | None = None          # bytes
    disk: int | None = None            # bytes; None: max(default, base image size)
    ssh_keys: list[str] = field(default_factory=list)
    admins: list[str] = field(default_factory=list)
    user_data: str | None = None       # extra cloud-config merged into the generated one
    cpu_guarantee: float | None = None
    cpu_limit: float | None = None
    ram_guarantee: int | None = None   # bytes
    ram_limit: int | None = None       # bytes
    segment: str | None = None
    gpus: int | None = None            # PCI GPUs passed through (segment gpu-dev)
    restart: str | None = None         # RESTART_POLICIES; None: by segment
    ephemeral: bool = False            # deleted, disk included, once it powers off
    ttl: int | None = None             # seconds after its creation it is deleted

    FIELDS = ()  # filled below

    @classmethod
    def from_dict(cls, data: Any) -> "VMSpec":
        """Parse and validate a request body. Unknown fields are refused."""
        if not isinstance(data, dict):
            raise BadRequest("VM spec must be a JSON object")
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise BadRequest(f"unknown field(s) in VM spec: {', '.join(unknown)}")
        if "name" not in data:
            raise BadRequest("name is required")
        spec = cls(name=_check_name(data["name"]))
        if data.get("image") is not None:
            spec.image = check_image_name(data["image"])
        if data.get("cpus") is not None:
            cpus = data["cpus"]
            if isinstance(cpus, bool) or not isinstance(cpus, int) and not (
                    isinstance(cpus, str) and cpus.isdigit()):
                raise BadRequest(f"cpus: expected a whole number, got {cpus!r}")
            spec.cpus = int(_number(int(cpus), "cpus", 1, MAX_CPUS))
        if data.get("memory") is not None:
            spec.memory = parse_size(data["memory"], "memory")
            if not MIN_MEMORY <= spec.memory <= MAX_MEMORY:
                raise BadRequest(f"memory: {format_size(spec.memory)} is out of range "
                                 f"({format_size(MIN_MEMORY)}..{format_size(MAX_MEMORY)}); "
                                 "give a unit, e.g. 2G or 512M")
        if data.get("disk") is not None:
            spec.disk = parse_size(data["disk"], "disk")
            if not MIN_DISK <= spec.disk <= MAX_DISK:
                raise BadRequest(f"disk: {format_size(spec.disk)} is out of range "
                                 f"({format_size(MIN_DISK)}..{format_size(MAX_DISK)})")
        spec.ssh_keys = _str_list(data.get("ssh_keys"), "ssh_keys")
        for key in spec.ssh_keys:
            if not SSH_KEY_RE.match(key.strip()):
                raise BadRequest(f"ssh_keys: not an OpenSSH public key: {key[:40]!r}")
        spec.ssh_keys = [k.strip() for k in spec.ssh_keys]
        spec.admins = _str_list(data.get("admins"), "admins")
        for user in spec.admins:
            if not USER_RE.fullmatch(user):
                raise BadRequest(f"admins: {user[:40]!r} is not a valid user name")
            if user in RESERVED_USERS:
                raise BadRequest(f"admins: {user!r} is a system account and cannot be an admin")
        if len(set(spec.admins)) != len(spec.admins):
            raise BadRequest("admins: duplicate user names")
        if data.get("user_data") is not None:
            parse_user_data(data["user_data"])
            spec.user_data = data["user_data"]
        if data.get("cpu_guarantee") is not None:
            spec.cpu_guarantee = _number(data["cpu_guarantee"], "cpu_guarantee", 0.01, MAX_CPUS)
        if data.get("cpu_limit") is not None:
            spec.cpu_limit = _number(data["cpu_limit"], "cpu_limit", 0.01, MAX_CPUS)
        if data.get("ram_guarantee") is not None:
            spec.ram_guarantee = parse_size(data["ram_guarantee"], "ram_guarantee")
        if data.get("ram_limit") is not None:
            spec.ram_limit = parse_size(data["ram_limit"], "ram_limit")
        if data.get("segment") is not None:
            spec.segment = _choice(data["segment"], "segment", SEGMENTS)
        if data.get("gpus") is not None:
            gpus = data["gpus"]
            if isinstance(gpus, bool) or not isinstance(gpus, int) and not (
                    isinstance(gpus, str) and gpus.isdigit()):
                raise BadRequest(f"gpus: expected a whole number, got {gpus!r}")
            spec.gpus = int(_number(int(gpus), "gpus", 0, MAX_GPUS))
        if data.get("restart") is not None:
            spec.restart = _choice(data["restart"], "restart", RESTART_POLICIES)
        if data.get("ephemeral") is not None:
            spec.ephemeral = parse_flag(data["ephemeral"], "ephemeral")
        if data.get("ttl") is not None:
            spec.ttl = parse_duration(data["ttl"], "ttl")
        if spec.ephemeral and spec.restart not in (None, "never"):
            raise BadRequest(f"restart: an ephemeral VM is deleted when it stops or "
                             f"breaks, it cannot be restarted ({spec.restart!r})")
        spec.check_allocation()
        return spec

    @property
    def restart_policy(self) -> str:
        """The restart policy in force: the spec's, else its segment's default. An
        ephemeral VM is never restarted: it is deleted once it stops or breaks
        (vmagent/vms/ephemeral.py), whatever its policy says."""
        if self.ephemeral:
            return "never"
        return self.restart or RESTART_DEFAULTS.get(self.segment or "", "never")

    def check_allocation(self) -> None:
        """Consistency of the allocation fields as given; the host completes and
        checks the rest (vmagent/alloc/sizing.py) and enforces them."""
        if (self.cpu_guarantee is not None and self.cpu_limit is not None
                and self.cpu_guarantee > self.cpu_limit):
            raise BadRequest(f"cpu_guarantee ({self.cpu_guarantee:g}) is above cpu_limit "
                             f"({self.cpu_limit:g})")
        if (self.ram_guarantee is not None and self.ram_limit is not None
                and self.ram_guarantee > self.ram_limit):
            raise BadRequest(f"ram_guarantee ({format_size(self.ram_guarantee)}) is above "
                             f"ram_limit ({format_size(self.ram_limit)})")
        if (self.segment in ("dev", "gpu-dev") and self.cpu_guarantee is not None
                and self.cpu_guarantee > DEV_CPU_GUARANTEE_MAX):
            raise BadRequest(f"cpu_guarantee {self.cpu_guarantee:g} is refused in segment "
                             f"{self.segment!r}: at most {DEV_CPU_GUARANTEE_MAX:g} cores are "
                             "guaranteed to developer VMs (use segment 'default' for more)")

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.FIELDS}

    def extra_cloud_config(self) -> dict[str, Any]:
        return parse_user_data(self.user_data) if self.user_data else {}


VMSpec.FIELDS = tuple(f.name for f in dataclasses.fields(VMSpec))


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{what}: expected a list of strings")
    if len(value) > 64:
        raise BadRequest(f"{what}: at most 64 entries")
    return list(value)


@dataclass(frozen=True)
class Defaults:
    """Host-level defaults for what a caller leaves out."""

    image: str = "debian-12"
    cpus: int = 2
    memory: int = 2 << 30
    disk: int = 10 << 30
    admins: tuple[str, ...] = ()       # people besides the owner (identity/accounts.py)
    segment: str = "dev"


def apply_defaults(spec: VMSpec, defaults: Defaults = Defaults(),
                   base_size: int | None = None) -> VMSpec:
    """The defaults phase: a new, complete spec. ``base_size`` is the base image's
    virtual size; the disk is never smaller than it."""
    out = dataclasses.replace(spec, ssh_keys=list(spec.ssh_keys), admins=list(spec.admins))
    out.image = out.image or defaults.image
    out.cpus = out.cpus or defaults.cpus
    out.memory = out.memory or defaults.memory
    out.segment = out.segment or defaults.segment
    out.restart = out.restart or out.restart_policy
    out.admins = out.admins or list(defaults.admins)
    if out.disk is None:
        out.disk = max(defaults.disk, base_size or 0)
    elif base_size is not None and out.disk < base_size:
        raise BadRequest(f"disk: {format_size(out.disk)} is smaller than the image "
                         f"{out.image!r} ({format_size(base_size)}); a disk can only grow")
    out.check_allocation()
    return out


def parse_flag(value: Any, what: str) -> bool:
    """A JSON boolean (or "true"/"false" from a query string); anything else is refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise BadRequest(f"{what}: expected true or false, got {value!r}")


def parse_timeout(value: Any, default: float, maximum: float = 3600) -> float:
    """Seconds (0 < t <= ``maximum``) or ``default`` when not given."""
    if value in (None, ""):
        return default
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"timeout: expected seconds, got {value!r}") from None
    if not 0 < t <= maximum:
        raise BadRequest(f"timeout: must be between 0 and {maximum:g} seconds")
    return t


def parse_offset_tail(offset: Any, tail: Any) -> tuple[int, int | None]:
    """``offset`` and ``tail`` of a log read: whole numbers, not negative (tail: None)."""
    try:
        offset = int(offset or 0)
        tail = None if tail in (None, "") else int(tail)
    except (TypeError, ValueError):
        raise BadRequest("offset and tail must be whole numbers") from None
    if offset < 0 or (tail is not None and tail < 0):
        raise BadRequest("offset and tail must not be negative")
    return offset, tail
