"""The guest accounts of a VM: who gets in, under which name, with which keys.

``admins`` are people (user names as the agent's callers are known), not guest
accounts. The owner and every admin get a guest account of their own name, with sudo
and their own SSH keys from the key registry (:mod:`vmagent.identity.keys`); the
owner's account also gets the keys the create request named (``ssh_keys``). An owner
whose name cannot be a guest account (``root``, an operator token's ``operator``) gets
the host's default account (``dev``). A person with no key anywhere is refused before
anything is made.

VMs made before people existed (no ``accounts`` in their state) keep the old meaning:
every admin name is a guest account with the spec's ``ssh_keys``
(:func:`from_spec`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from vmagent.errors import BadRequest
from vmagent.identity.keys import KeyRegistry
from vmagent.spec import RESERVED_USERS, USER_RE, VMSpec

DEFAULT_ACCOUNT = "dev"


@dataclass
class Account:
    name: str                                            # the guest user name
    people: list[str] = field(default_factory=list)      # whose account it is
    keys: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "people": list(self.people), "keys": list(self.keys)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Account":
        return cls(str(data["name"]), list(data.get("people") or []),
                   list(data.get("keys") or []))


def guest_name(person: str, default: str = DEFAULT_ACCOUNT) -> str:
    ok = USER_RE.fullmatch(person) and person not in RESERVED_USERS and person != "operator"
    return person if ok else default


def from_spec(spec: VMSpec) -> list[Account]:
    """The accounts of a VM made before people existed: its admins, the spec's keys."""
    return [Account(a, [], list(spec.ssh_keys)) for a in spec.admins]


def plan(owner: str, admins: list[str], default: str = DEFAULT_ACCOUNT) -> list[Account]:
    """The accounts (without keys) for ``owner`` and ``admins``, owner first."""
    accounts: dict[str, Account] = {}
    for person in [owner, *admins]:
        acc = accounts.setdefault(guest_name(person, default),
                                  Account(guest_name(person, default)))
        if person not in acc.people:
            acc.people.append(person)
    return list(accounts.values())


async def resolve(owner: str, admins: list[str], explicit: list[str],
                  registry: KeyRegistry, previous: list[Account] | None = None,
                  default: str = DEFAULT_ACCOUNT, require_keys: bool = True) -> tuple[
                      list[Account], list[str]]:
    """The accounts with their keys, and warnings (keys served stale). Refuses (400)
    when a person has no key at all (unless not ``require_keys``: a template's guest,
    whose keys are emptied before it is saved)."""
    known = {p: a.keys for a in previous or [] for p in a.people}
    accounts = plan(owner, admins, default)
    missing, warnings = [], []
    for acc in accounts:
        for person in acc.people:
            found = await registry.resolve(person)
            if found.warning:
                warnings.append(found.warning)
            keys = list(explicit if person == owner else []) + found.keys
            if not keys and person in known:     # kept from before (source emptied)
                keys = known[person]
            if not keys:
                missing.append(person)
            for k in keys:
                if k not in acc.keys:
                    acc.keys.append(k)
    if missing and require_keys:
        raise BadRequest(
            f"no SSH public key for {', '.join(missing)}: nobody could log in. Add one "
            "with 'vmctl key add ~/.ssh/id_ed25519.pub' (each user for themself; an "
            "operator with --user NAME), or give --ssh-key for the owner",
            users=missing)
    return accounts, warnings


def account_of(accounts: list[Account], person: str) -> Account | None:
    return next((a for a in accounts if person in a.people), None)


def changes(old: list[Account], new: list[Account]) -> tuple[list[Account], list[str]]:
    """(accounts to create or update, account names to remove) from ``old`` to ``new``."""
    before = {a.name: a for a in old}
    after = {a.name for a in new}
    upsert = [a for a in new if a.name not in before or before[a.name].keys != a.keys]
    return upsert, [name for name in before if name not in after]


def sync_script(upsert: list[Account], remove: list[str],
                groups: tuple[str, ...] = ("adm", "sudo")) -> str:
    """A shell program (run as root in the guest by the guest agent) that gives
    ``upsert`` their account, sudo and exactly their keys, and takes the accounts in
    ``remove`` away (keys emptied, sudo gone, locked, sessions ended, deleted). Every
    value is quoted; files are replaced by rename."""
    q = shlex.quote
    lines = ["set -eu"]
    for acc in upsert:
        u, keys = q(acc.name), "".join(f"{k}\n" for k in acc.keys)
        lines += [
            f"id -u {u} >/dev/null 2>&1 || useradd -m -s /bin/bash -G {','.join(groups)} {u}",
            f"printf '%s\\n' {q(f'{acc.name} ALL=(ALL) NOPASSWD:ALL')} "
            f"> /etc/sudoers.d/.vmagent-{acc.name}",
            f"chmod 440 /etc/sudoers.d/.vmagent-{acc.name}",
            f"mv -f /etc/sudoers.d/.vmagent-{acc.name} /etc/sudoers.d/90-vmagent-{acc.name}",
            f"h=$(getent passwd {u} | cut -d: -f6); g=$(id -gn {u})",
            f"install -d -m 700 -o {u} -g \"$g\" \"$h/.ssh\"",
            f"printf '%s' {q(keys)} > \"$h/.ssh/.authorized_keys.vmagent\"",
            f"chown {u}:\"$g\" \"$h/.ssh/.authorized_keys.vmagent\"",
            "chmod 600 \"$h/.ssh/.authorized_keys.vmagent\"",
            "mv -f \"$h/.ssh/.authorized_keys.vmagent\" \"$h/.ssh/authorized_keys\"",
        ]
    for name in remove:
        u = q(name)
        lines += [
            f"rm -f /etc/sudoers.d/90-vmagent-{name}",
            f"if id -u {u} >/dev/null 2>&1; then",
            f"  h=$(getent passwd {u} | cut -d: -f6); : > \"$h/.ssh/authorized_keys\" || true",
            f"  sed -i '/^{name} /d' /etc/sudoers.d/90-cloud-init-users 2>/dev/null || true",
            f"  usermod -L -e 1 {u}; pkill -KILL -u {u} || true",
            f"  for i in 1 2 3 4 5; do userdel -r {u} 2>/dev/null && break; sleep 0.2; done",
            "fi",
        ]
    lines.append("echo accounts-synced")
    return "\n".join(lines) + "\n"
