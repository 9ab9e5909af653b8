"""``vmctl create``: a VM from an image, a template or a pool (the spec options are in
:mod:`vmctl.commands.specopts`)."""

from __future__ import annotations

import shlex
from typing import Any

import click

from vmagent.spec import parse_duration

from .. import output
from ..app import App, command, pass_app
from ..errors import CLIError
from .common import checked, image_name, name_argument, vm_name
from .specopts import spec_options, spec_params


def _print_dry_run(app: App, doc: dict) -> None:
    argv = doc.get("argv") or []
    lines = [shlex.quote(argv[0])] if argv else []
    i = 1
    while i < len(argv):      # one option and its value per line
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            lines.append(f"{shlex.quote(argv[i])} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(argv[i]))
            i += 1
    out = ["# qemu command line (dry run: nothing was started)", " \\\n    ".join(lines)]
    alloc = doc.get("allocation")
    if alloc:
        want, lim = alloc.get("demand") or {}, alloc.get("limits") or {}
        cpu_limit = lim.get("cpu_limit")
        out += ["", f"# allocation on {alloc.get('host')}: reserves {want.get('cpu'):g} "
                f"cores, {output.size(want.get('ram'))} RAM, {want.get('gpus')} GPU(s); "
                f"limits: cpu {'none' if cpu_limit is None else f'{cpu_limit:g}'}, ram "
                f"{output.size(lim.get('ram_limit'))}; cgroup {alloc.get('cgroup')} "
                f"({alloc.get('enforcement')})"]
    for fname, text in (doc.get("seed") or {}).items():
        out += ["", f"# seed: {fname}", text.rstrip("\n")]
    click.echo("\n".join(out))


@command()
@name_argument
@spec_options
@click.option("--template", "-t", "template", metavar="TEMPLATE",
              help="Warm-start from a template's saved state (vmctl template list): "
                   "ready in seconds; cpus, memory, disk and image are the template's.")
@click.option("--pool", "-p", "pool", metavar="POOL",
              help="Take a ready clone from a warm pool (vmctl pool list): handed over "
                   "in under a second; it is the pool's template's clone.")
@click.option("--ephemeral", is_flag=True,
              help="Delete the VM, disk included, as soon as it powers off.")
@click.option("--ttl", metavar="DURATION",
              help="Delete the VM this long after its creation (e.g. 2h, 90m, 3600).")
@click.option("--dry-run", is_flag=True,
              help="Print the qemu command line and the seed files; start nothing.")
@click.option("--start/--no-start", default=True, help="Start the VM (default: yes).")
@click.option("--wait/--no-wait", default=True,
              help="Wait until SSH logs in (default: wait).")
@click.option("--timeout", type=click.FloatRange(1), default=600, show_default=True,
              help="Seconds to wait for SSH.")
@click.option("--cloud-init", "cloud_init", is_flag=True,
              help="Also wait until cloud-init finished (the user-data's runcmd, "
                   "packages...); by default the VM is ready when a login works.")
@pass_app
def create(app: App, name: str, template: str | None, pool: str | None,
           ephemeral: bool, ttl: str | None, dry_run: bool, start: bool,
           wait: bool, timeout: float, cloud_init: bool, **kw: Any) -> None:
    """Create a VM and (by default) wait until you can SSH into it."""
    name = vm_name(name)
    params = spec_params(app, kw, default_key=True)
    if ephemeral:
        params["ephemeral"] = True
    if ttl is not None:
        params["ttl"] = checked(parse_duration, ttl, "--ttl")
    if template and pool:
        raise CLIError("--template and --pool: give one (a pool's VMs are clones of its "
                       "template)", "bad_request")
    if pool:
        params["pool"] = pool
    elif template:
        params["template"] = vm_name(template)
    elif "image" not in params and app.config.default_image:
        params["image"] = checked(image_name, app.config.default_image)
    from .. import placement
    if dry_run:
        doc, placed = placement.create(app, name, params, None if pool else
                                       placement.plan(app, name, params), dry_run=True)
        if placed is not None:
            doc["placement"] = placed
        app.out.emit(doc, lambda: _print_dry_run(app, doc),
                     quiet=shlex.join(doc.get("argv") or []))
        return
    from .. import keys
    from ..progress import CREATE_PHASES, Progress, wait_ready
    from ..vmssh import try_login
    # the private halves of --ssh-key keys log in while waiting
    given = tuple(p.private for p in (keys.from_file(k) for k in kw.get("ssh_keys") or ())
                  if p.private is not None)
    # a pool is one host's: no placement
    decision = None if pool else placement.plan(app, name, params)
    progress = Progress(name, enabled=not app.quiet, login=start and wait,
                        cloud_init=cloud_init)
    with progress:
        status, placed = placement.create(app, name, {**params, "start": start}, decision)
        if start:
            progress.reach(*CREATE_PHASES)
        if start and wait:
            try:
                status = wait_ready(
                    app.call, name, progress, timeout=timeout, cloud_init=cloud_init,
                    login=lambda st: try_login(app.target, st, app.config,
                                               call=app.call, identities=given))
            except CLIError as exc:
                if exc.code == "timeout":
                    exc.message += (f"; the VM is still there: see 'vmctl console {name} "
                                    f"--log', or 'vmctl delete {name}'")
                raise
    where = f" on [bold]{placed['chosen']}[/]" if placed else ""
    human = (f"VM [bold]{name}[/] is ready{where}: [bold]vmctl ssh {name}[/]"
             if start and wait else f"VM [bold]{name}[/] created{where} "
                                    f"({status.get('state')})")
    if placed is not None:
        status = {**status, "placement": placed}
    app.out.emit(status, human, quiet=name)


COMMANDS = (create,)
