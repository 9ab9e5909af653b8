"""What a stream operation connects to (the ``stream`` of its row in ``vmagent/ops.py``):
the serial console's unix socket, the guest's forwarded SSH port, the VNC socket (the
screen). A new stream (another guest port) is one entry here and one row in the table."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from vmagent import rundir
from vmagent.context import RequestContext
from vmagent.errors import Conflict
from vmagent.qemu.qmp import connect_unix
from vmagent.vms.registry import VMRegistry
from vmagent.vms.state import State
from vmagent.vms.vm import VM


@dataclass
class Stream:
    """An open byte stream the server pipes a websocket to."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


async def _unix(vm: VM, name: str) -> Stream:
    sock = connect_unix(vm.run_dir / name)
    return Stream(*await asyncio.open_unix_connection(sock=sock))


async def _console(vm: VM) -> Stream:
    return await _unix(vm, rundir.CONSOLE_SOCK)


async def _vnc(vm: VM) -> Stream:
    return await _unix(vm, rundir.VNC_SOCK)


async def _ssh(vm: VM) -> Stream:
    return Stream(*await asyncio.open_connection("127.0.0.1", vm.rec.rt.ssh_port))


OPENERS: dict[str, Callable[[VM], Awaitable[Stream]]] = {
    "console": _console,
    "ssh": _ssh,
    "vnc": _vnc,
}


class VMStreams:
    def __init__(self, registry: VMRegistry) -> None:
        self.registry = registry

    async def open(self, kind: str, ctx: RequestContext, name: str) -> Stream:
        vm = self.registry.get(name)
        if vm.rec.rt.state != State.RUNNING:
            raise Conflict(f"VM {vm.name} is {vm.rec.rt.state.value}; its {kind} stream "
                           "needs it running")
        try:
            return await OPENERS[kind](vm)
        except OSError as e:
            raise Conflict(f"the {kind} of {vm.name} is not reachable: {e}") from e
