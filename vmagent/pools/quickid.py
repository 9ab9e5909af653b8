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

import asyncio
import base64
import logging
import re
import time
from typing import Any

from vmagent.errors import VMAgentError
from vmagent.identity.accounts import Account
from vmagent.qemu.guest import GuestAgent
from vmagent.qemu.qmp import Monitor

log = logging.getLogger(__name__)

# the sessions still waiting for qemu-ga's answer to the clock (the hand-over returned)
_PENDING: set[asyncio.Task] = set()

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


async def give(agent: GuestAgent, name: str, accounts: list[Account],
               member: list[dict[str, Any]], timings: dict[str, Any]) -> bool:
    """Give the member its final name, the taker's keys and the clock; False (nothing
    to undo: the full program follows) when it does not apply or the agent refused.
    Returns once the clock command is sent; the guest agent's channel stays taken a
    moment longer, until qemu-ga has also synced the RTC and answered."""
    if not applies(accounts, member):
        return False
    t0 = time.monotonic()
    keys = {a.name: "".join(k + "\n" for k in a.keys).encode() for a in accounts}
    steps: dict[str, float] = {}
    clock_sent = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_session(agent, name, keys, member, steps, clock_sent))
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)
    try:
        await asyncio.shield(clock_sent)
    except VMAgentError as e:
        timings["quick_identity_error"] = e.message
        return False
    except BaseException:
        task.cancel()
        raise
    timings["quick_identity_s"] = round(time.monotonic() - t0, 3)
    timings["quick_identity_steps"] = steps
    return True


async def _session(agent: GuestAgent, name: str, keys: dict[str, bytes],
                   member: list[dict[str, Any]], steps: dict[str, float],
                   clock_sent: asyncio.Future) -> None:
    """The hand-over's guest-agent commands; ``clock_sent`` is resolved once the clock
    command is written (or with the error that came first)."""
    t = time.monotonic()

    def step(what: str) -> None:
        nonlocal t
        now = time.monotonic()
        steps[what], t = round(now - t, 3), now
    try:
        async with agent.session(10) as mon:
            step("connect")
            await _write(mon, "/proc/sys/kernel/hostname", f"{name}\n".encode())
            await _write(mon, "/etc/hostname", f"{name}\n".encode())
            hosts = await _read(mon, "/etc/hosts")
            if _HOSTS_LINE.search(hosts):
                await _write(mon, "/etc/hosts", _HOSTS_LINE.sub(
                    lambda m: m.group(1) + f"{name} {name}".encode(), hosts, count=1))
            step("hostname")
            for acc in member:       # the taker's keys; every other account's emptied
                user = acc.get("name")
                await _write(mon, f"/home/{user}/.ssh/authorized_keys",
                             keys.get(user, b""))
            step("keys")
            # the clock last: qemu-ga sets it as it takes the command, then syncs the
            # RTC with `hwclock -w`, which waits for the RTC's next second (0.9-1.5 s
            # seen under TCG): the hand-over does not wait for that; this connection
            # does, so that no later client of the guest agent gets its answer
            clock = await mon.issue("guest-set-time", {"time": time.time_ns()}, 20)
            step("clock")
            clock_sent.set_result(None)
            try:
                await clock
            except VMAgentError as e:
                log.warning("%s: the guest's clock after the hand-over: %s", name,
                            e.message)
    except VMAgentError as e:
        if not clock_sent.done():
            clock_sent.set_exception(e)
        else:
            log.warning("%s: the guest agent after the hand-over: %s", name, e.message)
    except BaseException as e:
        if not clock_sent.done():
            if isinstance(e, Exception):
                clock_sent.set_exception(e)
            else:
                clock_sent.cancel()
        raise
