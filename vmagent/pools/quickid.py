"""The hand-over's identity without starting a program in the guest.

A pool member already has what makes a clone a machine of its own (host keys,
machine-id, a reseeded RNG: the fill's re-identification gave them). What the taker
adds is its name, its people's keys and the clock, which stood still while the member
was paused. The guest agent does these itself (``guest-set-time``; ``guest-file-*`` on
the hostname, ``/etc/hosts`` and each account's ``authorized_keys``), without a new
process to translate under TCG, in a few round trips. It applies when every account the
taker needs exists in the member (the pool's creator takes, or someone with the same
accounts); the keys of the member's other accounts are emptied. Anything else, or any
failure, falls back to the full re-identification program.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

from vmagent.errors import VMAgentError
from vmagent.identity.accounts import Account
from vmagent.qemu.qmp import Monitor, guest_agent

_HOSTS_LINE = re.compile(rb"^(127\.0\.1\.1[ \t]+).*$", re.M)


def applies(accounts: list[Account], member: list[dict[str, Any]]) -> bool:
    """Whether the member has every account the taker needs."""
    have = {a.get("name") for a in member}
    return bool(accounts) and {a.name for a in accounts} <= have


async def _write(mon: Monitor, path: str, data: bytes) -> None:
    handle = await mon.execute("guest-file-open", {"path": path, "mode": "w"}, 10)
    try:
        await mon.execute("guest-file-write", {
            "handle": handle, "buf-b64": base64.b64encode(data).decode()}, 10)
    finally:
        await mon.execute("guest-file-close", {"handle": handle}, 10)


async def _read(mon: Monitor, path: str, limit: int = 1 << 20) -> bytes:
    handle = await mon.execute("guest-file-open", {"path": path, "mode": "r"}, 10)
    out = b""
    try:
        while len(out) < limit:
            got = await mon.execute("guest-file-read", {"handle": handle,
                                                        "count": 65536}, 10)
            out += base64.b64decode(got.get("buf-b64") or "")
            if got.get("eof") or not got.get("count"):
                break
    finally:
        await mon.execute("guest-file-close", {"handle": handle}, 10)
    return out


async def give(qga: Any, name: str, accounts: list[Account],
               member: list[dict[str, Any]], timings: dict[str, Any]) -> bool:
    """Give the member its final name, the taker's keys and the clock; False (nothing
    to undo: the full program follows) when it does not apply or the agent refused."""
    if not applies(accounts, member):
        return False
    t0 = time.monotonic()
    keys = {a.name: "".join(k + "\n" for k in a.keys).encode() for a in accounts}
    try:
        async with guest_agent(qga, name, timeout=10) as mon:
            await mon.execute("guest-set-time", {"time": time.time_ns()}, 20)
            await _write(mon, "/proc/sys/kernel/hostname", f"{name}\n".encode())
            await _write(mon, "/etc/hostname", f"{name}\n".encode())
            hosts = await _read(mon, "/etc/hosts")
            if _HOSTS_LINE.search(hosts):
                await _write(mon, "/etc/hosts", _HOSTS_LINE.sub(
                    lambda m: m.group(1) + f"{name} {name}".encode(), hosts, count=1))
            for acc in member:       # the taker's keys; every other account's emptied
                user = acc.get("name")
                await _write(mon, f"/home/{user}/.ssh/authorized_keys",
                             keys.get(user, b""))
    except VMAgentError as e:
        timings["quick_identity_error"] = e.message
        return False
    timings["quick_identity_s"] = round(time.monotonic() - t0, 3)
    return True
