"""From the web UI's forms to operation parameters (the operations validate them; this
only reshapes text fields)."""

from __future__ import annotations

import re
from typing import Any, Mapping

from vmagent.errors import BadRequest

_SPLIT = re.compile(r"[\s,]+")


def text(form: Mapping[str, Any], key: str) -> str:
    value = form.get(key)
    return value.strip() if isinstance(value, str) else ""


def create_params(form: Mapping[str, Any]) -> dict[str, Any]:
    """The ``create`` parameters of the create form (image or template, cpus, memory,
    disk, segment, admins, an SSH key)."""
    name = text(form, "name")
    if not name:
        raise BadRequest("name: give the new VM a name")
    params: dict[str, Any] = {"name": name}
    source = text(form, "source") or "image"
    if source not in ("image", "template"):
        raise BadRequest("source: an image or a template")
    chosen = text(form, source)
    if source == "template":
        if not chosen:
            raise BadRequest("template: choose a template (or boot from an image)")
        params["template"] = chosen
    else:
        if chosen:
            params["image"] = chosen
        cpus = text(form, "cpus")
        if cpus:
            if not cpus.isdigit():
                raise BadRequest(f"cpus: {cpus[:20]!r} is not a whole number")
            params["cpus"] = int(cpus)
        for key in ("memory", "disk"):
            if text(form, key):
                params[key] = text(form, key)
    if text(form, "segment"):
        params["segment"] = text(form, "segment")
    admins = [a for a in _SPLIT.split(text(form, "admins")) if a]
    if admins:
        params["admins"] = admins
    key = text(form, "ssh_key")
    if key:
        params["ssh_keys"] = [line.strip() for line in key.splitlines() if line.strip()]
    return params


def safe_next(value: Any) -> str:
    """Where to go after signing in: a page of the UI, never another site."""
    if isinstance(value, str) and value.startswith("/ui/") and "//" not in value \
            and "\\" not in value and len(value) < 300:
        return value
    return "/ui/"
