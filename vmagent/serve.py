"""``vmagent serve``: run the agent in the foreground (what the systemd unit calls).

SIGTERM and SIGINT stop the agent and leave every VM running; the next start re-adopts
them. One agent per state dir (an flock on ``STATE_DIR/agent.lock``).

Who can reach the agent: its unix socket is 0660, owned by root and the socket group
(``--socket-group``, default ``vmagent``, made by ``scripts/setup``); the state dir lets
that group through to the socket (mode 0710) and nothing more: VM run dirs, images,
keys, tokens and the audit log stay readable by root only. TCP (``--listen``) needs a
bearer token: the token store's (``vmagent token add``) or the ``--token-file``'s; it
also serves the web UI at ``/ui/`` (browser sessions, docs/browser.md), over TLS with
``--tls-cert/--tls-key``.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import grp
import logging
import os
import signal
import socket
import ssl
import stat
from pathlib import Path

from aiohttp import web

from vmagent import __version__
from vmagent.alloc import config as agent_config
from vmagent.api.auth import BearerTokens, UnixPeer
from vmagent.api.server import AgentRunner, build_app
from vmagent.api.ui import browser_url
from vmagent.api.ui.assets import Assets
from vmagent.api.ui.routes import WebUI
from vmagent.app import Agent, Settings
from vmagent.images.catalog import Catalog, default_catalog_dir

log = logging.getLogger("vmagent")

DEFAULT_SOCKET_GROUP = "vmagent"
PRIVATE = ("vms", "images", "templates", "builds", "keys", "cache", "pools")


class StartupError(Exception):
    pass


def prepare_socket(path: Path) -> None:
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


def socket_gid(group: str | None) -> int | None:
    """The socket group's gid. The default group may be missing (then only root gets
    in, with a warning); a group asked for by name must exist. A per-user agent (not
    root: ``vmctl --local``) has no socket group: it is its user's alone."""
    if os.geteuid() != 0 and not group:
        return None
    name = group or DEFAULT_SOCKET_GROUP
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if group:
            raise StartupError(f"--socket-group {group}: no such group") from None
        log.warning("group %s does not exist (scripts/setup makes it): only root can use "
                    "the agent's socket", name)
        return None


def secure_state_dir(state_dir: Path, sock_path: Path, gid: int | None) -> None:
    """The state dir lets the socket group through to the socket and nothing more."""
    for name in PRIVATE:
        (state_dir / name).mkdir(exist_ok=True)
        os.chmod(state_dir / name, 0o700)
    if gid is not None and sock_path.parent.resolve() == state_dir:
        os.chown(state_dir, os.geteuid(), gid)
        os.chmod(state_dir, 0o710)
    else:
        os.chmod(state_dir, 0o700)


def read_token_file(path: str) -> str:
    """The ``--token-file`` token: refused when others may read it (as ssh refuses a
    private key that is not private)."""
    try:
        st = os.stat(path)
        token = Path(path).read_text().strip()
    except OSError as e:
        raise StartupError(f"cannot read token file {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise StartupError(f"token file {path} is readable by others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
    if len(token) < 16:
        raise StartupError(f"the token in {path} is too short (at least 16 characters)")
    return token


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """TLS for the TCP listener (``--tls-cert`` and ``--tls-key``, both or neither)."""
    if not cert and not key:
        return None
    if not cert or not key:
        raise StartupError("--tls-cert and --tls-key go together: give both")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise StartupError(f"TLS: {e.filename}: no such file") from None
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"TLS: cannot load the certificate {cert} with the key "
                           f"{key}: {e}") from None
    return ctx


async def serve(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "agent.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StartupError(f"another vmagent is running with state dir {state_dir}") from None
    token = read_token_file(args.token_file) if args.token_file else None
    tls = tls_context(getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
    if tls is not None and not args.listen:
        raise StartupError("--tls-cert/--tls-key are for the TCP listener: add --listen")
    sock_path = Path(args.socket) if args.socket else state_dir / "vmagent.sock"
    gid = socket_gid(args.socket_group)
    secure_state_dir(state_dir, sock_path, gid)
    catalog = Catalog.load(args.catalog or default_catalog_dir())
    try:
        config = agent_config.load(getattr(args, "config", None))
    except agent_config.ConfigError as e:
        raise StartupError(str(e)) from None
    agent = Agent(Settings(state_dir=state_dir, catalog=catalog, defaults=config.defaults,
                           config=config,
                           qemu_binary=args.qemu, accel_override=args.accel,
                           keys_url=args.keys_url, keys_ttl=args.keys_ttl,
                           allow_local_urls=args.allow_local_urls))
    await agent.start([Path(k) for k in args.probe_kernel])
    log.info("vmagent %s: accel %s (%s); %d VM(s)", __version__, agent.host.accel_name,
             agent.host.accel.reason if agent.host.accel else "", len(agent.registry))

    runners = []
    listening = []
    prepare_socket(sock_path)
    runner = AgentRunner(build_app(agent.dispatcher, UnixPeer(args.operator_group)),
                           handle_signals=False, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(sock_path)).start()
    if gid is not None:
        os.chown(sock_path, os.geteuid(), gid)
    # a per-user agent's socket is its user's alone
    os.chmod(sock_path, 0o660 if gid is not None or os.geteuid() == 0 else 0o600)
    runners.append(runner)
    log.info("listening on unix:%s", sock_path)
    if args.listen:
        host, port = args.listen
        bearer = BearerTokens(agent.tokens, token)
        # the web UI (/ui/) is a client of the same dispatcher, with browser sessions
        ui = WebUI(agent.dispatcher, agent.links.tokens, agent.activity,
                   identify=bearer.caller_of, still_valid=bearer.still_valid,
                   assets=Assets.find(getattr(args, "novnc_dir", None),
                                      getattr(args, "xterm_dir", None)),
                   tls=tls is not None)
        tcp = AgentRunner(build_app(agent.dispatcher, bearer, ui=ui.app()),
                            handle_signals=False, access_log=None)
        await tcp.setup()
        await web.TCPSite(tcp, host, port, ssl_context=tls).start()
        runners.append(tcp)
        host, port = tcp.addresses[0][:2]         # port 0: the one the kernel chose
        scheme = "https" if tls else "http"
        listening.append(f"{scheme}://{host}:{port}")
        agent.links.base_url = getattr(args, "public_url", None) or \
            browser_url(host, port, tls is not None)
        log.info("listening on %s://%s:%d (bearer token required; web UI at %s/ui/)",
                 scheme, host, port, agent.links.base_url)

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
