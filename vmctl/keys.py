"""The SSH key vmctl puts into new VMs and logs in with.

Order: the config's ``ssh_key``; the caller's ``~/.ssh/id_{ed25519,ecdsa,rsa}.pub``; else
a key pair vmctl generates once with ``ssh-keygen`` at ``~/.config/vmctl/id_ed25519``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod
from .errors import CLIError

PREFERRED = ("id_ed25519", "id_ecdsa", "id_rsa")


@dataclass(frozen=True)
class KeyPair:
    public: Path
    private: Path | None       # None when only the public half is known

    def public_text(self) -> str:
        try:
            text = self.public.read_text().strip()
        except OSError as exc:
            raise CLIError(f"cannot read SSH public key {self.public}: {exc.strerror}",
                           "bad_request") from None
        if not text or "PRIVATE KEY" in text:
            raise CLIError(f"{self.public} is not an OpenSSH public key", "bad_request")
        return text


def _pair(public: Path) -> KeyPair:
    private = public.with_suffix("") if public.suffix == ".pub" else None
    return KeyPair(public, private if private is not None and private.is_file() else None)


def from_file(path: str | os.PathLike) -> KeyPair:
    """An explicit key: ``path`` is the public key, or a private key next to its .pub."""
    p = Path(path).expanduser()
    if p.suffix != ".pub" and p.with_name(p.name + ".pub").is_file():
        p = p.with_name(p.name + ".pub")
    if not p.is_file():
        raise CLIError(f"SSH key {p} does not exist", "bad_request")
    return _pair(p)


def vmctl_key_path() -> Path:
    return config_mod.config_dir() / "id_ed25519"


def default_key(cfg: config_mod.Config | None = None, *, generate: bool = True) -> KeyPair | None:
    if cfg is not None and cfg.ssh_key is not None:
        return from_file(cfg.ssh_key)
    ssh_dir = Path("~/.ssh").expanduser()
    for name in PREFERRED:
        if (ssh_dir / f"{name}.pub").is_file():
            return _pair(ssh_dir / f"{name}.pub")
    own = vmctl_key_path()
    if own.with_suffix(".pub").is_file():
        return _pair(own.with_suffix(".pub"))
    return generate_key(own) if generate else None


def generate_key(private: Path) -> KeyPair:
    if shutil.which("ssh-keygen") is None:
        raise CLIError("no SSH key found in ~/.ssh and ssh-keygen is not installed to make "
                       "one; give --ssh-key FILE", "bad_request")
    private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmctl",
                           "-f", str(private)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise CLIError(f"ssh-keygen failed: {proc.stderr.strip() or proc.returncode}",
                       "internal")
    return KeyPair(private.with_suffix(".pub"), private)


def identity_files(cfg: config_mod.Config | None) -> list[Path]:
    """Private keys to offer when logging into a VM (without generating one)."""
    out = []
    pair = default_key(cfg, generate=False)
    if pair is not None and pair.private is not None:
        out.append(pair.private)
    own = vmctl_key_path()
    if own.is_file() and own not in out:
        out.append(own)
    return out
