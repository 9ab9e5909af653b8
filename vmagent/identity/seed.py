"""The cloud-init NoCloud seed: cloud-config built from data, and the ``cidata`` ISO.

Everything is generated as Python data and rendered with ``yaml.safe_dump`` (never string
templates), so whatever a caller puts in ``user_data`` survives unchanged. The functions
are pure except :func:`write_seed_iso`.
"""

from __future__ import annotations

import copy
import io
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from vmagent.identity import hostkeys
from vmagent.identity.accounts import Account, from_spec
from vmagent.errors import BadRequest
from vmagent.fsutil import atomic_write
from vmagent.spec import VMSpec

USER_DATA_RENDERED_MAX = 256 * 1024
VOLUME_ID = "cidata"            # NoCloud finds its seed by this filesystem label
SUDO_RULE = "ALL=(ALL) NOPASSWD:ALL"
ADMIN_GROUPS = ("adm", "sudo")
# Password logins off through an sshd drop-in written before sshd first starts, rather
# than cloud-init's ``ssh_pwauth: false``: that edits sshd_config in cloud-init's config
# stage, after sshd started, and restarts sshd, so a login that worked when SSH first
# answered could be refused a moment later (readiness is that first login, vmctl's
# progress.py). Left out when the image's or the caller's cloud-config sets
# ``ssh_pwauth`` (their choice, applied by cloud-init as before).
SSHD_AUTH_CONF = "/etc/ssh/sshd_config.d/05-vmagent-auth.conf"
SSHD_AUTH = "# written by vmagent: no password logins\nPasswordAuthentication no\n"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_MISSING = object()


class _Dumper(yaml.SafeDumper):
    """Safe dumper that never emits anchors/aliases (shared lists are written out)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def represent_str(self, data: str) -> yaml.ScalarNode:
        # multi-line text (files, keys) as a literal block where YAML allows one
        # (the emitter falls back to quoting where it does not)
        return self.represent_scalar("tag:yaml.org,2002:str", data,
                                     style="|" if "\n" in data else None)


_Dumper.add_representer(str, _Dumper.represent_str)


def _dump(doc: Any) -> bytes:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=4096).encode("utf-8")


def new_instance_id(name: str) -> str:
    """A fresh instance-id; changing it makes cloud-init re-run per-instance modules."""
    return f"{name}-{uuid.uuid4().hex[:12]}"


def build_meta_data(name: str, instance_id: str) -> dict[str, str]:
    return {"instance-id": instance_id, "local-hostname": name}


def build_network_config(mac: str, ifname: str = "eth0") -> dict[str, Any]:
    """Network config version 2 (top level ``version: 2``, no ``network:`` wrapper, the
    form NoCloud's ``network-config`` file takes): DHCPv4 on the NIC with this MAC.
    ``set-name`` gives the device a fixed name: the ENI renderer (Debian's ifupdown)
    needs one and cloud-init adds a udev rename rule for it."""
    mac_l = mac.strip().lower() if isinstance(mac, str) else ""
    if not _MAC_RE.fullmatch(mac_l):
        raise BadRequest(f"invalid MAC address {str(mac)[:40]!r}")
    return {"version": 2, "ethernets": {ifname: {
        "match": {"macaddress": mac_l}, "set-name": ifname, "dhcp4": True}}}


def _generated(spec: VMSpec, accounts: list[Account]) -> dict[str, Any]:
    users = [{"name": acc.name, "groups": list(ADMIN_GROUPS), "shell": "/bin/bash",
              "sudo": SUDO_RULE, "lock_passwd": True,
              "ssh_authorized_keys": list(acc.keys)} for acc in accounts]
    return {"hostname": spec.name, "fqdn": spec.name, "preserve_hostname": False,
            # always present, even empty: a missing ``users`` creates the image's
            # "default" user
            "users": users,
            "disable_root": True,
            "write_files": [{"path": SSHD_AUTH_CONF, "permissions": "0644",
                             "content": SSHD_AUTH}],
            # resolve the own hostname (sudo complains otherwise); C.UTF-8 exists on
            # every image, a default like en_US.UTF-8 fails on images without locales
            "manage_etc_hosts": True, "locale": "C.UTF-8",
            # keep host keys across instance-id changes (push_config); without the
            # agent's keys (the caller's user-data makes its own), cc_ssh generates the
            # missing types at first boot
            "ssh_deletekeys": False}


def _merge(base: Any, over: Any) -> Any:
    """dicts recursively, lists concatenated (base first), otherwise ``over`` wins."""
    if base is _MISSING:
        return copy.deepcopy(over)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(out.get(key, _MISSING), value)
        return out
    if isinstance(base, list) and isinstance(over, list):
        return base + copy.deepcopy(over)
    return copy.deepcopy(over)


def _merge_users(base: list[Any], over: Any, where: str) -> list[Any]:
    if isinstance(over, dict):            # legacy form {name: {config}}
        over = [{"name": k, **(v if isinstance(v, dict) else {})} for k, v in over.items()]
    elif isinstance(over, str):
        over = [over]
    if not isinstance(over, list):
        raise BadRequest(f"{where}: 'users' must be a list")
    entries: list[Any] = []
    for entry in over:                    # cloud-init splits "a, b" entries too
        entries += ([u.strip() for u in entry.split(",") if u.strip()]
                    if isinstance(entry, str) else [entry])
    out = copy.deepcopy(base)
    by_name = {u["name"]: u for u in out if isinstance(u, dict) and "name" in u}
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else entry
        if name == "default":
            raise BadRequest(f"{where}: the 'default' user is not supported; "
                             "list your users explicitly (admins get the VM's ssh_keys)")
        if not isinstance(name, str) or name not in by_name:
            out.append(copy.deepcopy(entry))
            if isinstance(entry, dict) and isinstance(name, str):
                by_name[name] = out[-1]
        elif isinstance(entry, dict):     # (a bare name of an existing user adds nothing)
            entry = dict(entry)
            if isinstance(entry.get("groups"), str):
                entry["groups"] = [g.strip() for g in entry["groups"].split(",") if g.strip()]
            merged = _merge(by_name[name], entry)
            for key in ("groups", "ssh_authorized_keys"):
                if isinstance(merged.get(key), list):
                    merged[key] = [v for i, v in enumerate(merged[key])
                                   if v not in merged[key][:i]]
            by_name[name].clear()
            by_name[name].update(merged)
    return out


def merge_cloud_config(base: dict[str, Any], over: dict[str, Any],
                       where: str = "user_data") -> dict[str, Any]:
    """Merge ``over`` into ``base`` (neither is modified); see :func:`build_user_data`."""
    if not isinstance(over, dict):
        raise BadRequest(f"{where}: cloud-config must be a mapping")
    out = dict(base)
    for key, value in over.items():
        if key == "users" and isinstance(out.get("users"), list):
            out["users"] = _merge_users(out["users"], value, where)
        else:
            out[key] = _merge(out.get(key, _MISSING), value)
    return out


def build_user_data(spec: VMSpec, extra: dict[str, Any] | None = None,
                    host_keys: hostkeys.Keys | None = None,
                    accounts: list[Account] | None = None) -> dict[str, Any]:
    """The cloud-config of a VM: the generated part (its guest ``accounts``,
    :mod:`vmagent.identity.accounts`, by default those of the spec's admins; the SSH
    host keys the agent made, :mod:`vmagent.identity.hostkeys`), then ``extra`` (the
    image's), then the caller's ``spec.user_data``, each merged with these rules:

    * mappings merge recursively;
    * lists concatenate, generated entries first (``runcmd``, ``packages``, ...);
    * ``users``: an entry whose ``name`` is a user already present (an admin) is merged
      into it (same rules; its ``ssh_authorized_keys`` and ``groups`` are added,
      deduplicated; a ``groups`` string "a, b" counts as a list); other entries append;
      the ``default`` user is refused (BadRequest): it would create the image's stock
      user;
    * anything else: the later layer wins, including generated security settings
      (``ssh_pwauth``, ``disable_root``, ``ssh_deletekeys``, an admin's ``sudo``,
      ``lock_passwd``, ``shell``): overriding them is the caller's explicit choice
      for their own VM. Password logins are off through an sshd drop-in
      (:data:`SSHD_AUTH_CONF`), left out when a layer sets ``ssh_pwauth``.

    Raises BadRequest if a layer is not a mapping or the rendered document is over
    256 KiB."""
    doc = _generated(spec, from_spec(spec) if accounts is None else accounts)
    if host_keys:
        doc = merge_cloud_config(doc, hostkeys.cloud_config(host_keys), "host keys")
    if extra is not None:
        doc = merge_cloud_config(doc, extra, "image cloud-config")
    doc = merge_cloud_config(doc, spec.extra_cloud_config())
    if "ssh_pwauth" in doc:               # a layer chose: cloud-init applies it
        doc["write_files"] = [f for f in doc["write_files"]
                              if not (isinstance(f, dict) and f.get("path") == SSHD_AUTH_CONF)]
    render_user_data(doc)                 # validates the size
    return doc


def render_user_data(doc: dict[str, Any]) -> bytes:
    """``#cloud-config`` plus the YAML of ``doc``; BadRequest when over 256 KiB."""
    if not isinstance(doc, dict):
        raise BadRequest("user_data: cloud-config must be a mapping")
    data = b"#cloud-config\n" + _dump(doc)
    if len(data) > USER_DATA_RENDERED_MAX:
        raise BadRequest(f"user_data: the merged cloud-config is {len(data)} bytes, over "
                         f"the limit of {USER_DATA_RENDERED_MAX // 1024} KiB")
    return data


def render_seed(spec: VMSpec, instance_id: str, mac: str,
                extra: dict[str, Any] | None = None,
                host_keys: hostkeys.Keys | None = None,
                accounts: list[Account] | None = None) -> dict[str, bytes]:
    """The three NoCloud files, by their exact names."""
    return {"meta-data": _dump(build_meta_data(spec.name, instance_id)),
            "user-data": render_user_data(build_user_data(spec, extra, host_keys,
                                                          accounts)),
            "network-config": _dump(build_network_config(mac))}


def _iso_names(names: list[str]) -> dict[str, str]:
    """ISO9660 level-1 identifiers ("USERDATA.;1"), unique, for each long name."""
    out: dict[str, str] = {}
    for name in names:
        base = re.sub(r"[^A-Z0-9_]", "", name.upper())[:8] or "FILE"
        cand, i = base, 1
        while f"/{cand}.;1" in out.values():
            cand, i = f"{base[:8 - len(str(i))]}{i}", i + 1
        out[name] = f"/{cand}.;1"
    return out


def iso_bytes(files: dict[str, bytes]) -> bytes:
    """An ISO9660 image labelled ``cidata`` with Joliet and Rock Ridge names."""
    for name in files:
        if not name or "/" in name or len(name) > 64 or name in (".", ".."):
            raise BadRequest(f"invalid seed file name {name!r}")
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    try:
        for name, iso_path in _iso_names(sorted(files)).items():
            data = files[name]
            iso.add_fp(io.BytesIO(data), len(data), iso_path, rr_name=name,
                       joliet_path=f"/{name}", file_mode=0o100444)
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write_seed_iso(path: Path, files: dict[str, bytes]) -> None:
    """Write the seed ISO atomically (a running qemu keeps reading the old inode)."""
    atomic_write(path, iso_bytes(files), mode=0o644)


def read_seed_iso(path_or_bytes: str | os.PathLike[str] | bytes) -> dict[str, bytes]:
    """The files of a seed ISO by their long (Rock Ridge, else Joliet) names."""
    fp: Any = (io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray))
               else open(path_or_bytes, "rb"))
    iso = pycdlib.PyCdlib()
    try:
        iso.open_fp(fp)
        rr = iso.has_rock_ridge()
        if not rr and not iso.has_joliet():
            raise BadRequest("seed ISO has neither Rock Ridge nor Joliet names")
        kind = "rr_path" if rr else "joliet_path"
        out: dict[str, bytes] = {}
        for child in iso.list_children(**{kind: "/"}):
            if child.is_file():
                name = (child.rock_ridge.name().decode() if rr
                        else child.file_identifier().decode("utf-16_be"))
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, **{kind: f"/{name}"})
                out[name] = buf.getvalue()
        return out
    finally:
        iso.close()
        fp.close()
