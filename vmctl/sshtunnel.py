"""The SSH transport: reach an agent on another host through an SSH connection.

paramiko connects with the user's SSH agent and keys, checks the host key against
``~/.ssh/known_hosts`` (unknown hosts are refused: ``ssh`` to the host once first) and
honours ``~/.ssh/config`` (HostName, Port, User, IdentityFile). Each connection the client
makes goes through a private local unix socket (in a 0700 temp directory) that is
forwarded over the one SSH connection to the agent's unix socket (an OpenSSH
``direct-streamlocal@openssh.com`` channel) or to its loopback TCP port (``direct-tcpip``).
So HTTP requests and websockets use the same code as for a local agent.
"""

from __future__ import annotations

import atexit
import getpass
import os
import select
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import paramiko
from paramiko.message import Message
from paramiko.common import cMSG_CHANNEL_OPEN

from .address import Address
from .errors import Unreachable


def open_streamlocal(transport: paramiko.Transport, path: str,
                     timeout: float = 30.0) -> paramiko.Channel:
    """Open a ``direct-streamlocal@openssh.com`` channel to the unix socket ``path`` on the
    server. paramiko's ``open_channel`` only packs addresses for TCP forwarding, so this
    mirrors it with the streamlocal payload (socket path, reserved string, reserved int)."""
    if not transport.active:
        raise paramiko.SSHException("SSH session not active")
    transport.lock.acquire()
    try:
        window = transport._sanitize_window_size(None)
        packet = transport._sanitize_packet_size(None)
        chanid = transport._next_channel()
        m = Message()
        m.add_byte(cMSG_CHANNEL_OPEN)
        m.add_string("direct-streamlocal@openssh.com")
        m.add_int(chanid)
        m.add_int(window)
        m.add_int(packet)
        m.add_string(path)
        m.add_string("")
        m.add_int(0)
        chan = paramiko.Channel(chanid)
        transport._channels.put(chanid, chan)
        transport.channel_events[chanid] = event = threading.Event()
        transport.channels_seen[chanid] = True
        chan._set_transport(transport)
        chan._set_window(window, packet)
    finally:
        transport.lock.release()
    transport._send_user_message(m)
    deadline = time.monotonic() + timeout
    while not event.wait(0.05):
        if not transport.active or time.monotonic() > deadline:
            break
    chan = transport._channels.get(chanid)
    if chan is None or not event.is_set():
        raise paramiko.ChannelException(2, f"cannot open a channel to {path}")
    return chan


def _pump(sock: socket.socket, chan: paramiko.Channel) -> None:
    open_ends = {sock: True, chan: True}
    try:
        while any(open_ends.values()):
            readable, _, _ = select.select([e for e, o in open_ends.items() if o], [], [], 5)
            for end in readable:
                data = end.recv(65536)
                other = chan if end is sock else sock
                if data:
                    other.sendall(data)
                    continue
                open_ends[end] = False
                try:
                    if other is chan:
                        chan.shutdown_write()
                    else:
                        sock.shutdown(socket.SHUT_WR)
                except OSError:
                    open_ends[other] = False
            if chan.closed:
                break
    except (OSError, paramiko.SSHException):
        pass
    finally:
        sock.close()
        chan.close()


class SSHTunnel:
    """One SSH connection to ``address`` and a local unix socket forwarded through it."""

    def __init__(self, address: Address, *, timeout: float = 20.0) -> None:
        self.address = address
        self.timeout = timeout
        self.client: paramiko.SSHClient | None = None
        self._dir: str | None = None
        self._server: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        a = self.address
        return (f"127.0.0.1:{a.agent_port}" if a.agent_port is not None else a.path) or ""

    def _connect(self) -> paramiko.SSHClient:
        a = self.address
        cfg = paramiko.SSHConfig()
        user_cfg = Path("~/.ssh/config").expanduser()
        if user_cfg.is_file():
            try:
                cfg = paramiko.SSHConfig.from_path(str(user_cfg))
            except Exception:      # a config paramiko cannot parse: go without it
                cfg = paramiko.SSHConfig()
        host_cfg = cfg.lookup(a.host or "")
        hostname = host_cfg.get("hostname", a.host)
        port = a.port or int(host_cfg.get("port", 22))
        user = a.user or host_cfg.get("user") or getpass.getuser()
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        for known in host_cfg.get("userknownhostsfile", "").split():
            if Path(known).expanduser().is_file():
                client.load_host_keys(str(Path(known).expanduser()))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        keys = [os.path.expanduser(k) for k in host_cfg.get("identityfile", [])
                if Path(os.path.expanduser(k)).is_file()]
        where = f"ssh://{user}@{hostname}:{port}"
        try:
            client.connect(hostname, port=port, username=user, key_filename=keys or None,
                           timeout=self.timeout, banner_timeout=self.timeout,
                           auth_timeout=self.timeout)
        except paramiko.BadHostKeyException:
            raise Unreachable(f"{where}: the host key does not match known_hosts "
                              "(refusing to connect)") from None
        except paramiko.SSHException as exc:
            text = str(exc)
            if "not found in known_hosts" in text:
                raise Unreachable(f"{where}: the host key is not in known_hosts; connect "
                                  f"once with 'ssh -p {port} {user}@{hostname}' to "
                                  "check and accept it") from None
            raise Unreachable(f"{where}: SSH failed: {text}") from None
        except OSError as exc:
            raise Unreachable(f"{where}: cannot connect: "
                              f"{exc.strerror or exc}") from None
        return client

    def _channel(self) -> paramiko.Channel:
        assert self.client is not None
        transport = self.client.get_transport()
        a = self.address
        try:
            if a.agent_port is not None:
                return transport.open_channel("direct-tcpip", ("127.0.0.1", a.agent_port),
                                              ("127.0.0.1", 0), timeout=self.timeout)
            return open_streamlocal(transport, a.path or "", self.timeout)
        except (paramiko.SSHException, OSError) as exc:
            raise Unreachable(f"{a}: the SSH server refused to forward to the agent at "
                              f"{self.target} ({exc}); is vmagent running there, and "
                              "does sshd allow forwarding?") from None

    def socket_path(self) -> str:
        """The local unix socket forwarded to the agent (connects on first use)."""
        with self._lock:
            if self._server is None:
                self.client = self._connect()
                self._channel().close()          # fail here, clearly, if forwarding fails
                self._dir = tempfile.mkdtemp(prefix="vmctl-ssh-")
                path = os.path.join(self._dir, "agent.sock")
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.bind(path)
                server.listen(16)
                self._server = server
                threading.Thread(target=self._accept, daemon=True).start()
                atexit.register(self.close)
            return os.path.join(self._dir or "", "agent.sock")

    def _accept(self) -> None:
        while self._server is not None:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            try:
                chan = self._channel()
            except Unreachable:
                conn.close()
                continue
            threading.Thread(target=_pump, args=(conn, chan), daemon=True).start()

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
