"""The VM spec's fields as options and as request fields: shared by ``vmctl create``
and ``vmctl push-config`` (its own module, so that a command imports only the other
command modules it needs)."""

from __future__ import annotations

from typing import Any, Callable

import click

from vmagent.spec import RESTART_POLICIES, SEGMENTS

from ..app import App
from .common import complete_image, image_name, size_arg, text_file


def spec_options(fn: Callable) -> Callable:
    """The spec fields as options (shared by create and push-config)."""
    options = [
        click.option("--image", "-i", shell_complete=complete_image,
                     help="Image to boot (default: the config's default_image, else the "
                          "agent's default, debian-12)."),
        click.option("--cpus", "-c", type=click.IntRange(1, 64), help="Virtual CPUs."),
        click.option("--memory", "-m", metavar="SIZE", help="RAM, e.g. 2G or 512M."),
        click.option("--disk", "-d", metavar="SIZE", help="Disk size, e.g. 20G (grows the "
                     "image's disk; never smaller than the image)."),
        click.option("--ssh-key", "ssh_keys", multiple=True, metavar="FILE",
                     type=click.Path(dir_okay=False),
                     help="Public key to put into the VM (repeatable). Default: the "
                          "config's ssh_key, ~/.ssh/id_*.pub, or a key vmctl generates."),
        click.option("--user-data", type=click.File("rb"), metavar="FILE",
                     help="Extra cloud-config (YAML) merged into the generated one "
                          "('-' reads stdin)."),
        click.option("--admin", "admins", multiple=True, metavar="USER",
                     help="Admin user with sudo and the SSH keys (repeatable; the first "
                          "is the SSH user). Default: dev."),
        click.option("--segment", type=click.Choice(SEGMENTS),
                     help="Hardware segment (dev, default, gpu-dev)."),
        click.option("--cpu-guarantee", type=float, metavar="CORES",
                     help="Cores promised under contention, reserved on the host while "
                          "the VM exists (at most 2 in dev segments)."),
        click.option("--cpu-limit", type=float, metavar="CORES",
                     help="Hard ceiling of CPU time, in cores (segment default only; "
                          "default: the vCPUs)."),
        click.option("--ram-guarantee", metavar="SIZE",
                     help="RAM promised and reserved (default: the RAM limit)."),
        click.option("--ram-limit", metavar="SIZE",
                     help="Ceiling of qemu's memory: guest RAM + qemu's overhead "
                          "(default); --memory defaults from it."),
        click.option("--gpus", type=click.IntRange(0, 8), metavar="N",
                     help="GPUs passed through (segment gpu-dev; default 1 there)."),
        click.option("--restart", type=click.Choice(RESTART_POLICIES),
                     help="Restart policy when it breaks: never, on-failure (default in "
                          "segment default), always (also when the guest powers off)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def spec_params(app: App, kw: dict[str, Any], *, default_key: bool) -> dict[str, Any]:
    """Request fields from the options (validated here where it is cheap to)."""
    from .. import keys
    params: dict[str, Any] = {}
    if kw.get("image"):
        params["image"] = image_name(kw["image"])
    if kw.get("cpus") is not None:
        params["cpus"] = kw["cpus"]
    for field in ("memory", "disk", "ram_guarantee", "ram_limit"):
        if kw.get(field) is not None:
            params[field] = size_arg(kw[field], field)
    for field in ("cpu_guarantee", "cpu_limit", "segment", "gpus", "restart"):
        if kw.get(field) is not None:
            params[field] = kw[field]
    if kw.get("admins"):
        params["admins"] = list(kw["admins"])
    if kw.get("user_data") is not None:
        params["user_data"] = text_file(kw["user_data"], "--user-data")
    if kw.get("ssh_keys"):
        params["ssh_keys"] = [keys.from_file(k).public_text() for k in kw["ssh_keys"]]
    elif default_key:
        pair = keys.default_key(app.config)
        if pair is not None:
            params["ssh_keys"] = [pair.public_text()]
    return params
