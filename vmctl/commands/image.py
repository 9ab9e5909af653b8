"""``vmctl image list | import | pull | build | rm``."""

from __future__ import annotations

import os

import click

from .. import output
from ..app import App, group, pass_app
from ..errors import CLIError
from .common import complete_image, confirm, image_name


def _image_line(img: dict) -> str:
    return (f"image {img.get('name')}: {img.get('format')}, "
            f"{output.size(img.get('virtual_size'))}, boot {img.get('boot')}")


def _agent_path(app: App, path: str | None, what: str) -> str | None:
    """Paths name files on the agent's host: absolute for a local agent; a remote agent
    needs an absolute path on its host."""
    if path is None:
        return None
    if app.client.is_local:
        return os.path.abspath(os.path.expanduser(path))
    if not path.startswith("/"):
        raise CLIError(f"{what}: give an absolute path on the agent's host "
                       f"({app.target.label}), not {path!r}", "bad_request")
    return path


@group()
def image() -> None:
    """Images: list, import, pull, build, remove."""


@image.command("list")
@pass_app
def list_(app: App) -> None:
    """Images in the agent's store and in its catalog (pullable)."""
    doc = app.call("image_list")
    images = doc.get("images", [])
    app.out.emit(doc, lambda: app.out.console.print(
        output.image_table(images, doc.get("catalog", []))),
        quiet="\n".join(i["name"] for i in images) or None)


@image.command("import")
@click.argument("file")
@click.option("--name", "-n", required=True, help="Name of the image in the store.")
@click.option("--kernel", metavar="FILE", help="Boot this kernel directly.")
@click.option("--initrd", metavar="FILE", help="Initrd for --kernel.")
@click.option("--append", metavar="ARGS", help="Kernel command line for --kernel.")
@click.option("--sha256", metavar="HEX", help="Expected SHA-256 of FILE.")
@click.option("--description", metavar="TEXT")
@pass_app
def import_(app: App, file: str, name: str, kernel: str | None, initrd: str | None,
            append: str | None, sha256: str | None, description: str | None) -> None:
    """Import a qcow2/raw disk FILE (a path on the agent's host) into the store."""
    if initrd and not kernel:
        raise click.UsageError("--initrd needs --kernel")
    if append and not kernel:
        raise click.UsageError("--append needs --kernel")
    doc = app.call("image_import", image=image_name(name),
                   path=_agent_path(app, file, "FILE"),
                   kernel=_agent_path(app, kernel, "--kernel"),
                   initrd=_agent_path(app, initrd, "--initrd"), append=append,
                   sha256=sha256, description=description)
    app.out.emit(doc, _image_line(doc), quiet=doc.get("name"))


@image.command()
@click.argument("name", shell_complete=complete_image)
@click.option("--url", help="Download from this URL instead of the catalog.")
@click.option("--sha256", metavar="HEX", help="Expected SHA-256 (required with --url).")
@click.option("--timeout", type=click.FloatRange(1, 86400), default=3600,
              show_default=True, help="Seconds the agent gives the download.")
@click.option("--wait/--no-wait", default=True,
              help="Follow the pull until it ends (default), or return once it runs.")
@click.option("--cancel", is_flag=True, help="Cancel the running pull of NAME.")
@pass_app
def pull(app: App, name: str, url: str | None, sha256: str | None, timeout: float,
         wait: bool, cancel: bool) -> None:
    """Download a catalog image (or --url) into the store, verifying its digest.

    The agent runs the pull as a job bounded by --timeout and a minimum rate; it goes
    on if vmctl is stopped (follow it again with the same command, or --cancel it).
    """
    name = image_name(name)
    if cancel:
        doc = app.call("image_pull_cancel", image=name)
        app.out.emit(doc, f"pull of {name} cancelled")
        return
    if url and not sha256:
        raise click.UsageError("--url needs --sha256")
    doc = app.call("image_pull", image=name, url=url, sha256=sha256, timeout=timeout,
                   wait=False)
    if wait and doc.get("state") == "running":
        from ..buildprogress import BuildProgress, follow
        with BuildProgress(name, enabled=not app.quiet, title=f"pulling {name}") as progress:
            doc = follow(app.call, name, progress, timeout=timeout + 60,
                         op="image_pull_status", what="pull", again="vmctl image pull")
    elif doc.get("state") in ("failed", "cancelled"):
        raise CLIError(f"pull of {name} {doc['state']}: {doc.get('error')}", "image_error",
                       details={"pull": doc})
    img = doc.get("result") or {}
    app.out.emit(doc, _image_line(img) if img else
                 f"pulling {name}; follow it with 'vmctl image pull {name}'", quiet=name)


@image.command()
@click.argument("name", shell_complete=complete_image)
@click.option("--replace", is_flag=True,
              help="Replace the image if it is in the store (refused while VMs use it).")
@click.option("--wait/--no-wait", default=True,
              help="Follow the build until it ends (default), or return once it runs.")
@click.option("--timeout", type=click.FloatRange(1), default=7200, show_default=True,
              help="Seconds to follow the build.")
@pass_app
def build(app: App, name: str, replace: bool, wait: bool, timeout: float) -> None:
    """Build an image from its catalog recipe on the agent's host.

    debootstrap from the distribution's package mirror, a partitioned disk with
    GRUB, compressed qcow2, into the store. Takes minutes; shows the steps live.
    Running it again while the build runs follows that build.
    """
    name = image_name(name)
    doc = app.call("image_build", image=name, replace=replace or None)
    if wait:
        from ..buildprogress import BuildProgress, follow
        with BuildProgress(name, enabled=not app.quiet) as progress:
            doc = follow(app.call, name, progress, timeout=timeout)
    res = doc.get("result") or {}
    human = (f"image [bold]{name}[/] built in {doc.get('seconds', 0):.0f}s: "
             f"{output.human_size(res.get('actual_size'))} qcow2, "
             f"{output.size(res.get('virtual_size'))} disk, sha256 {res.get('sha256')}"
             if doc.get("state") == "done" else
             f"building image {name} (step {doc.get('step')}); follow it with "
             f"'vmctl image build {name}'")
    app.out.emit(doc, human, quiet=name)


@image.command("rm")
@click.argument("name", shell_complete=complete_image)
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@pass_app
def rm(app: App, name: str, yes: bool) -> None:
    """Remove an image that no VM uses."""
    confirm(f"Remove image {name!r}?", yes)
    doc = app.call("image_remove", image=image_name(name))
    app.out.emit(doc, f"removed image {name}")


COMMANDS = (image,)
