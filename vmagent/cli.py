"""The ``vmagent`` command: ``serve`` (the agent, :mod:`vmagent.serve`), ``token``
(the TCP API's bearer tokens, :mod:`vmagent.api.tokens`: run as root on the host) and
``build-image IMAGE DIR`` (bake a catalog recipe into a directory, no agent:
:mod:`vmagent.images.build.local`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from vmagent import __version__
from vmagent.api.auth import OPERATORS_GROUP
from vmagent.api.tokens import TokenStore
from vmagent.errors import VMAgentError
from vmagent.images.build import local
from vmagent.serve import StartupError, serve

DEFAULT_STATE_DIR = "/var/lib/vmagent"


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _public_url(value: str) -> str:
    from urllib.parse import urlsplit
    u = urlsplit(value)
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") \
            or u.query or u.fragment:
        raise argparse.ArgumentTypeError(f"expected http(s)://HOST[:PORT], got {value!r}")
    return value.rstrip("/")


def _state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=os.environ.get("VMAGENT_STATE_DIR",
                                                         DEFAULT_STATE_DIR))


def _serve_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the agent in the foreground")
    _state_dir(p)
    p.add_argument("--config", metavar="FILE", help="the agent's config file: name, "
                   "segments, capacity, defaults, cgroups, GPUs (default $VMAGENT_CONFIG, "
                   "else /etc/vmagent/agent.toml if it exists; docs/allocation.md)")
    p.add_argument("--socket", help="unix socket path (default STATE_DIR/vmagent.sock)")
    p.add_argument("--socket-group", help="group that may use the socket (default "
                   "vmagent; missing: only root)")
    p.add_argument("--operator-group", default=OPERATORS_GROUP,
                   help="members are operators on the socket (default %(default)s)")
    p.add_argument("--listen", type=_parse_listen, metavar="HOST:PORT",
                   help="also listen on TCP, bearer tokens required (port 0: any free "
                        "port, printed in the ready line)")
    p.add_argument("--token-file", help="a file with one operator token for TCP (mode "
                   "0600), besides the tokens of 'vmagent token'")
    p.add_argument("--tls-cert", metavar="FILE", help="serve the TCP listener (API and "
                   "web UI) over TLS with this certificate chain (PEM); with --tls-key")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--public-url", metavar="URL", type=_public_url, help="where browsers reach the TCP "
                   "listener, for the links of 'vmctl ui' and 'vmctl vnc' (default: "
                   "from --listen)")
    p.add_argument("--novnc-dir", metavar="DIR", help="noVNC's files (default: "
                   "/usr/share/novnc, from Debian's novnc package)")
    p.add_argument("--xterm-dir", metavar="DIR", help="xterm.js's npm packages (default: "
                   "/usr/local/share/vmagent/web/node_modules/@xterm)")
    p.add_argument("--keys-url", metavar="URL", help="where people's SSH keys are when "
                   "the keys directory has none, e.g. https://keys.example.org/{user}.keys")
    p.add_argument("--keys-ttl", type=float, default=300.0, metavar="SECONDS",
                   help="how long keys fetched from --keys-url are used (default 300)")
    p.add_argument("--allow-local-urls", action="store_true",
                   help="let image pulls reach loopback and private addresses (link-local "
                        "ones never)")
    p.add_argument("--accel", choices=("kvm", "tcg"), default=os.environ.get("VMAGENT_ACCEL"),
                   help="skip the KVM probe and use this accelerator")
    p.add_argument("--probe-kernel", action="append", default=[],
                   help="a Linux kernel to verify KVM with (default: image kernels)")
    p.add_argument("--catalog", help="image catalog directory")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="qemu binary")
    p.add_argument("--log-level", default=os.environ.get("VMAGENT_LOG_LEVEL", "INFO"))


def _build_image_args(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build-image", help="build a catalog image into a directory on "
                       "this host, without an agent (cached by its inputs; root)")
    b.add_argument("image", help="a catalog entry with a [build] recipe, e.g. test")
    b.add_argument("directory", help="where the disk, vmlinuz, initrd.img go")
    b.add_argument("--disk-name", help="the disk's file name (default IMAGE.qcow2)")
    b.add_argument("--cache-dir", default=os.environ.get("VMAGENT_BUILD_CACHE",
                                                         str(local.DEFAULT_CACHE)),
                   help="the builder's package and debootstrap cache "
                        "(default $VMAGENT_BUILD_CACHE or %(default)s)")
    b.add_argument("--catalog", help="image catalog directory")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")


def _token_args(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="bearer tokens for the TCP API")
    tsub = p.add_subparsers(dest="token_command", required=True)
    add = tsub.add_parser("add", help="make a token for USER and print it (once)")
    add.add_argument("user")
    add.add_argument("--role", choices=("user", "operator", "metrics"), default="user",
                     help="metrics: may read /v1/metrics and /v1/unistat only (a scraper)")
    lst = tsub.add_parser("list", help="the tokens (ids, users, roles; never the tokens)")
    rev = tsub.add_parser("revoke", help="revoke a token by its id")
    rev.add_argument("id")
    for q in (add, lst, rev):
        _state_dir(q)
        q.add_argument("--json", action="store_true", help="print JSON")


def token_command(args: argparse.Namespace) -> int:
    store = TokenStore(args.state_dir)
    if args.token_command == "add":
        rec, token = store.add(args.user, args.role)
        if args.json:
            print(json.dumps({**rec.public(), "token": token}, indent=2))
        else:
            print(token)
            print(f"token {rec.id} for {rec.user} ({rec.role}); it is not shown again",
                  file=sys.stderr)
    elif args.token_command == "list":
        records = [r.public() for r in store.list()]
        if args.json:
            print(json.dumps({"tokens": records}, indent=2))
        else:
            for r in records:
                print(f"{r['id']}  {r['user']:<16} {r['role']:<8} {r['created']}")
    else:
        rec = store.revoke(args.id)
        print(json.dumps(rec.public(), indent=2) if args.json else
              f"revoked token {rec.id} of {rec.user}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmagent", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"vmagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_args(sub)
    _token_args(sub)
    _build_image_args(sub)
    args = parser.parse_args(argv)
    if args.command == "build-image":
        return local.command(args.image, args.directory, catalog_dir=args.catalog,
                             cache_dir=args.cache_dir, disk_name=args.disk_name,
                             force=args.force)
    try:
        if args.command == "token":
            return token_command(args)
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        asyncio.run(serve(args))
    except (StartupError, VMAgentError) as e:
        print(f"vmagent: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"vmagent: {e.filename}: permission denied (run as root)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
