"""``vmagent serve``: run the agent in the foreground (what the systemd unit calls).

SIGTERM and SIGINT stop the agent and leave every VM running; the next start re-adopts
them. One agent per state dir (an flock on ``STATE_DIR/agent.lock``).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from aiohttp import web

from vmagent import __version__
from vmagent.api.auth import StaticToken, UnixPeer
from vmagent.api.server import build_app
from vmagent.app import Agent, Settings
from vmagent.errors import VMAgentError
from vmagent.images.catalog import Catalog, default_catalog_dir
from vmagent.spec import Defaults

log = logging.getLogger("vmagent")
DEFAULT_STATE_DIR = "/var/lib/vmagent"


class StartupError(Exception):
    pass


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _prepare_socket(path: Path) -> None:
    """Remove a stale socket left by a killed agent; refuse if an agent answers on it."""
    if len(os.fsencode(str(path))) > 107:
        raise StartupError(f"socket path is too long for a unix socket: {path}")
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise StartupError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise StartupError(f"another agent is listening on {path}")


async def serve(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "agent.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StartupError(f"another vmagent is running with state dir {state_dir}") from None
    token = None
    if args.listen:
        if not args.token_file:
            raise StartupError("--listen needs --token-file: TCP requests require a token")
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise StartupError(f"cannot read token file {args.token_file}: {e.strerror}")
        if len(token) < 16:
            raise StartupError(f"the token in {args.token_file} is too short "
                               "(at least 16 characters)")
    catalog = Catalog.load(args.catalog or default_catalog_dir())
    agent = Agent(Settings(state_dir=state_dir, catalog=catalog, defaults=Defaults(),
                           qemu_binary=args.qemu, accel_override=args.accel))
    await agent.start([Path(k) for k in args.probe_kernel])
    log.info("vmagent %s: accel %s (%s); %d VM(s)", __version__, agent.host.accel_name,
             agent.host.accel.reason if agent.host.accel else "", len(agent.registry))

    runners = []
    listening = []
    sock_path = Path(args.socket) if args.socket else state_dir / "vmagent.sock"
    _prepare_socket(sock_path)
    runner = web.AppRunner(build_app(agent.dispatcher, UnixPeer()), handle_signals=False,
                           access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(sock_path)).start()
    os.chmod(sock_path, 0o660)
    runners.append(runner)
    log.info("listening on unix:%s", sock_path)
    if args.listen:
        host, port = args.listen
        tcp = web.AppRunner(build_app(agent.dispatcher, StaticToken(token)),
                            handle_signals=False, access_log=None)
        await tcp.setup()
        await web.TCPSite(tcp, host, port).start()
        runners.append(tcp)
        host, port = tcp.addresses[0][:2]         # port 0: the one the kernel chose
        listening.append(f"http://{host}:{port}")
        log.info("listening on http://%s:%d (bearer token required)", host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # the line tests and scripts wait for (with the TCP address, when --listen has port 0)
    print(f"vmagent {__version__} ready on unix:{sock_path}"
          + "".join(f" {a}" for a in listening), flush=True)
    await stop.wait()
    log.info("stopping; VMs keep running")
    for r in runners:
        await r.cleanup()
    # a stopped agent leaves no socket behind (clients then say "no agent", not
    # "connection refused"); the flock is still held, so no other agent owns it yet
    try:
        if stat.S_ISSOCK(sock_path.lstat().st_mode):
            sock_path.unlink()
    except FileNotFoundError:
        pass
    await agent.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmagent", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"vmagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the agent in the foreground")
    p.add_argument("--state-dir", default=os.environ.get("VMAGENT_STATE_DIR",
                                                         DEFAULT_STATE_DIR))
    p.add_argument("--socket", help="unix socket path (default STATE_DIR/vmagent.sock)")
    p.add_argument("--listen", type=_parse_listen, metavar="HOST:PORT",
                   help="also listen on TCP (requires --token-file; port 0: any free port, "
                        "printed in the ready line)")
    p.add_argument("--token-file", help="file holding the bearer token for TCP")
    p.add_argument("--accel", choices=("kvm", "tcg"), default=os.environ.get("VMAGENT_ACCEL"),
                   help="skip the KVM probe and use this accelerator")
    p.add_argument("--probe-kernel", action="append", default=[],
                   help="a Linux kernel to verify KVM with (default: image kernels)")
    p.add_argument("--catalog", help="image catalog directory")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="qemu binary")
    p.add_argument("--log-level", default=os.environ.get("VMAGENT_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except (StartupError, VMAgentError) as e:
        print(f"vmagent: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
