"""SSH host keys a VM's sshd uses, made by the agent on its host.

A guest that makes its own keys at first boot spends seconds on it under TCG (RSA: about
10 s here, and a random amount: the prime search) and the agent learns them only from
the console. Made on the host (``cryptography``, milliseconds) they go into the seed
(cloud-init's ``ssh_keys``, which also skips cloud-init's own key generation) or, for a
warm-started clone, through the guest agent (:mod:`vmagent.reidentify`); the agent keeps
them in the run dir (``host_keys.json``, 0600: the seed ISO holds them as well), reports
the public halves in the VM's status, and vmctl pins those in its known_hosts.
RSA is left out: it takes long to make and every current client takes ed25519.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from vmagent.fsutil import atomic_write

TYPES = ("ed25519", "ecdsa")
FILE = "host_keys.json"
SSHD_CONF = "/etc/ssh/sshd_config.d/05-vmagent-hostkeys.conf"

Keys = dict[str, tuple[str, str]]       # {type: (private key, OpenSSH format; public line)}


def generate(comment: str) -> Keys:
    """Fresh keys of :data:`TYPES`, made with the host's RNG."""
    out = {}
    for kind in TYPES:
        key = (ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else
               ec.generate_private_key(ec.SECP256R1()))
        private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                    ser.NoEncryption()).decode()
        public = key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                               ser.PublicFormat.OpenSSH).decode()
        out[kind] = (private, f"{public} {comment}")
    return out


def placeholders() -> Keys:
    """What a dry run shows instead of keys: it makes none, and prints no private key."""
    return {kind: (f"<{kind} private key, made at create>",
                   f"<{kind} public key, made at create>") for kind in TYPES}


def public(keys: Keys) -> list[str]:
    return [pub for _, pub in keys.values()]


def sshd_conf(keys: Keys) -> str:
    """sshd offers these keys only (not the missing types of its built-in default)."""
    return "".join(["# written by vmagent: the host keys it made for this VM\n",
                    *(f"HostKey /etc/ssh/ssh_host_{kind}_key\n" for kind in keys)])


def cloud_config(keys: Keys) -> dict[str, Any]:
    """The cloud-config that installs ``keys`` at first boot (and again, unchanged, at
    an instance-id change). cloud-init then makes no keys of its own and need not print
    them on the console: the agent reports them."""
    return {"ssh_keys": {f"{kind}_{half}": value for kind, (priv, pub) in keys.items()
                         for half, value in (("private", priv), ("public", pub))},
            "ssh": {"emit_keys_to_console": False},
            "write_files": [{"path": SSHD_CONF, "permissions": "0644",
                             "content": sshd_conf(keys)},
                            # cloud-init (22.4) writes the public halves 0600: readable
                            # again by all, as ssh-keygen makes them, once it is done
                            *({"path": f"/etc/ssh/ssh_host_{kind}_key.pub",
                               "permissions": "0644", "content": pub.strip() + "\n",
                               "defer": True} for kind, (_, pub) in keys.items())]}


def overridden(*layers: dict[str, Any] | None) -> bool:
    """The image's or the caller's cloud-config (the ``layers``) handles host keys itself
    (``ssh_keys``, ``ssh_genkeytypes``): theirs wins, and the guest's keys are then
    learnt from its console."""
    return any(isinstance(layer, dict) and ("ssh_keys" in layer or "ssh_genkeytypes" in
                                            layer) for layer in layers)


def for_vm(name: str, *layers: dict[str, Any] | None, dry_run: bool = False) -> Keys | None:
    """Keys for a new VM (:func:`placeholders` for a dry run), or None when
    :func:`overridden`."""
    if overridden(*layers):
        return None
    return placeholders() if dry_run else generate(f"root@{name}")


def save(run_dir: Path, keys: Keys) -> None:
    atomic_write(run_dir / FILE, json.dumps({k: list(v) for k, v in keys.items()},
                                            indent=1).encode(), 0o600)


def load(run_dir: Path) -> Keys | None:
    """The VM's keys, or None (a VM whose guest made its own)."""
    try:
        data = json.loads((run_dir / FILE).read_text())
        return {str(k): (str(v[0]), str(v[1])) for k, v in data.items()}
    except (OSError, ValueError, TypeError, IndexError):    # missing or unreadable
        return None
