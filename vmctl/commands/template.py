"""``vmctl template create | list | show | rm``: booted guests saved for warm starts.

A VM is warm-started from a template with ``vmctl create NAME --template T``.
"""

from __future__ import annotations

from typing import Any

import click

from .. import output
from ..app import App, group, pass_app
from ..errors import CLIError
from .common import (complete_image, complete_names, confirm, image_name, size_arg,
                     text_file, vm_name)


def _complete_template(ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[str]:
    return complete_names(ctx, "template_list", "templates", "name", incomplete)


def template_argument(fn: Any) -> Any:
    return click.argument("template", shell_complete=_complete_template)(fn)


def _table(templates: list[dict]) -> Any:
    from rich.table import Table
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "IMAGE", "CPUS", "MEMORY", "DISK", "STATE FILE", "VMS", "CREATED"):
        table.add_column(col)
    for t in templates:
        table.add_row(t["name"], t["image"], str(t["cpus"]), output.size(t["memory"]),
                      output.size(t["disk"]), output.human_size(t["state_size"]),
                      str(len(t.get("vms") or [])), t.get("created") or "")
    return table


def _details(t: dict) -> Any:
    from rich.table import Table
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("name", t["name"]), ("image", t["image"]), ("cpus", str(t["cpus"])),
            ("memory", output.size(t["memory"])), ("disk", output.size(t["disk"])),
            ("state file", f"{output.human_size(t['state_size'])} sha256 "
                           f"{t['state_sha256'][:16]}..."),
            ("built in", f"{t.get('build_seconds')}s (state saved in "
                         f"{t.get('save_seconds')}s)"),
            ("VMs", ", ".join(t.get("vms") or []) or "-"),
            ("created", t.get("created") or ""), ("path", t.get("path") or "")]
    for k, v in rows:
        table.add_row(k, v)
    return table


def _create_with_progress(app: App, template: str, params: dict, timeout: float) -> dict:
    """``template_create`` is one long call (boot, cloud-init, save): it runs in a thread
    while the template's build steps and console are shown from ``template_show``."""
    import threading

    from ..buildprogress import BuildProgress
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["doc"] = app.call("template_create", **params)
        except BaseException as e:          # handed to the main thread
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    progress = BuildProgress(template, enabled=not app.quiet and not app.json,
                             title=f"template {template}")
    worker.start()
    with progress:
        while worker.is_alive() or "error" in result:
            worker.join(1.0)
            try:
                doc = app.call("template_show", template=template)
            except CLIError:
                doc = {}                    # not started yet, or a failure before it did
            if doc.get("kind") == "template_build":      # the build job, while it runs
                progress.update(doc)
            if not worker.is_alive():
                break                       # one last look at a failed build's steps
        if "doc" in result and progress.doc:
            last = progress.doc
            names = [st["name"] for st in last.get("steps", [])]
            steps = [{**st, "state": "done"} for st in last.get("steps", [])] + \
                [{"name": n, "state": "done", "seconds": 0.0}
                 for n in last.get("all_steps", []) if n not in names]
            progress.update({**last, "steps": steps,
                             "seconds": result["doc"].get("build_seconds", 0)})
    if "error" in result:
        raise result["error"]
    return result["doc"]


@group()
def template() -> None:
    """Templates: booted guests saved for warm starts (vmctl create NAME --template T)."""


@template.command("create")
@template_argument
@click.option("--image", "-i", shell_complete=complete_image,
              help="Image to boot (default: the config's default_image, else the "
                   "agent's default).")
@click.option("--cpus", "-c", type=click.IntRange(1, 64),
              help="Virtual CPUs (every clone has these).")
@click.option("--memory", "-m", metavar="SIZE", help="RAM (every clone has it).")
@click.option("--disk", "-d", metavar="SIZE", help="Disk size (every clone has it).")
@click.option("--user-data", type=click.File("rb"), metavar="FILE",
              help="Extra cloud-config for the template's boot (what it installs, "
                   "every clone has).")
@click.option("--ssh-key", "ssh_keys", multiple=True, metavar="FILE",
              type=click.Path(dir_okay=False),
              help="Public key for the template VM (clones get their own keys).")
@click.option("--timeout", type=click.FloatRange(60), default=1200, show_default=True,
              help="Seconds for the template VM to boot and be saved.")
@pass_app
def create(app: App, template: str, image: str | None, cpus: int | None,
           memory: str | None, disk: str | None, user_data: Any,
           ssh_keys: tuple[str, ...], timeout: float) -> None:
    """Boot IMAGE, wait for cloud-init and SSH, save the running guest as TEMPLATE."""
    params: dict[str, Any] = {"template": vm_name(template), "timeout": timeout}
    if image or app.config.default_image:
        params["image"] = image_name(image or app.config.default_image)
    if cpus is not None:
        params["cpus"] = cpus
    for key, value in (("memory", memory), ("disk", disk)):
        if value is not None:
            params[key] = size_arg(value, key)
    if user_data is not None:
        params["user_data"] = text_file(user_data, "--user-data")
    if ssh_keys:
        from .. import keys
        params["ssh_keys"] = [keys.from_file(k).public_text() for k in ssh_keys]
    doc = _create_with_progress(app, template, params, timeout)
    app.out.emit(doc, f"template [bold]{template}[/] saved "
                      f"({output.human_size(doc.get('state_size'))} of state, "
                      f"{doc.get('build_seconds')}s): vmctl create NAME --template "
                      f"{template}", quiet=template)


@template.command("list")
@pass_app
def list_(app: App) -> None:
    """List the templates."""
    doc = app.call("template_list")
    items = doc.get("templates", [])
    human: Any = (lambda: app.out.console.print(_table(items))) if items else \
        "no templates (create one with 'vmctl template create T --image I')"
    app.out.emit(doc, human, quiet="\n".join(t["name"] for t in items) or None)


@template.command("show")
@template_argument
@pass_app
def show(app: App, template: str) -> None:
    """Show one template."""
    doc = app.call("template_show", template=vm_name(template))
    if doc.get("state") == "building":
        human: Any = (f"template {template} is being built: step {doc.get('step')}, "
                      f"{doc.get('seconds')}s so far")
    elif doc.get("state") == "failed":
        human = (f"the last build of template {template} failed at step "
                 f"{doc.get('step')}: {doc.get('error')}")
    else:
        human = lambda: app.out.console.print(_details(doc))  # noqa: E731
    app.out.emit(doc, human, quiet=doc.get("name"))


@template.command("rm")
@template_argument
@click.option("--force", is_flag=True,
              help="Remove even while VMs use it (its disk stays until they are "
                   "deleted).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@pass_app
def rm(app: App, template: str, force: bool, yes: bool) -> None:
    """Remove a template (refused while VMs use it, unless --force)."""
    template = vm_name(template)
    confirm(f"Remove template {template!r}?", yes)
    doc = app.call("template_remove", template=template, force=force or None)
    kept = doc.get("disk_kept_for") or []
    app.out.emit(doc, f"removed template {template}" + (
        f" (its disk stays for {', '.join(kept)})" if kept else ""))


COMMANDS = (template,)
