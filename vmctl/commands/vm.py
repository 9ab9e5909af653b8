"""VM lifecycle: list, show, start, stop, reboot, reset, poweroff, hard-reset, delete,
push-config, snapshot, snapshots, wait."""

from __future__ import annotations

from typing import Any

import click

from .. import output
from ..app import App, Command, command, pass_app
from .common import confirm, name_argument, vm_name
from .specopts import spec_options, spec_params


def _state_line(status: dict) -> str:
    extra = f" ({status['reason']})" if status.get("reason") else ""
    return f"{status.get('name')}: {status.get('state')}{extra}"


def _end_ssh_masters(app: App, name: str) -> None:
    """The VM's boot ended (stop, reboot, reset, delete): stop its SSH masters
    (vmctl/sshmaster.py), so nothing reaches it through a connection of that boot."""
    from .. import sshmaster
    sshmaster.close(app.target, name)


def _lifecycle(cmd_name: str, op: str, help_text: str,
               timeout_help: str | None = None, *, ends_boot: bool = True) -> Command:
    """A command CMD_NAME that runs the operation ``op`` on one VM (and passes --timeout,
    an operation parameter, when the operation takes one); ``ends_boot``: the operation
    ends the VM's current boot (its SSH masters are closed after it)."""
    def run(app: App, name: str, timeout: float | None = None) -> None:
        params: dict[str, Any] = {"name": vm_name(name)}
        if timeout is not None:
            params["timeout"] = timeout
        status = app.call(op, **params)
        if ends_boot:
            _end_ssh_masters(app, params["name"])
        app.out.emit(status, _state_line(status))

    if timeout_help:
        @click.option("--timeout", type=click.FloatRange(0), metavar="SECONDS",
                      help=timeout_help)
        @name_argument
        @pass_app
        def cmd(app: App, name: str, timeout: float | None) -> None:
            run(app, name, timeout)
    else:
        @name_argument
        @pass_app
        def cmd(app: App, name: str) -> None:
            run(app, name)
    cmd.__doc__ = help_text
    return command(cmd_name)(cmd)


start = _lifecycle("start", "start", "Start a stopped VM.", ends_boot=False)
stop = _lifecycle("stop", "shutdown", "Shut the VM down gracefully (ACPI), forcing it off "
                  "after the timeout.", "Seconds to wait for the guest (agent default).")
reboot = _lifecycle("reboot", "reboot", "Reboot through the guest, falling back to a "
                    "reset.", "Seconds to wait for the guest (agent default).")
reset = _lifecycle("reset", "reset", "Hardware reset (like the reset button).")
poweroff = _lifecycle("poweroff", "poweroff", "Stop qemu immediately (like pulling the "
                      "plug).")
hard_reset = _lifecycle("hard-reset", "hard_reset", "Kill qemu and start it again.")


@command("list")
@click.option("--all", "-a", "all_", is_flag=True,
              help="Every VM of the host, not only yours (operators).")
@pass_app
def list_(app: App, all_: bool) -> None:
    """List your VMs (those you own or administer): on every host of the config file
    (with a HOST column) unless --host names one."""
    from .. import placement
    names = placement.fleet(app)
    if names is not None:
        vms, down = placement.list_all(app, names, all_)
        for p in down:
            app.out.info(f"{p.name}: not listed: {p.error}")
        doc = {"vms": vms, "hosts": names,
               "unreachable": [{"host": p.name, "error": p.error} for p in down]}
    else:
        doc = app.call("list", all=all_ or None)
    vms = doc.get("vms", [])
    human: Any = ((lambda: app.out.console.print(output.vm_table(vms))) if vms
                  else "no VMs (create one with 'vmctl create NAME')")
    app.out.emit(doc, human, quiet="\n".join(vm["name"] for vm in vms) or None)


@command()
@name_argument
@pass_app
def show(app: App, name: str) -> None:
    """Show one VM: spec, state, SSH address and readiness."""
    status = app.call("status", name=vm_name(name))
    app.out.emit(status, lambda: app.out.console.print(output.vm_details(status)),
                 quiet=status.get("state"))


@command()
@name_argument
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@pass_app
def delete(app: App, name: str, yes: bool) -> None:
    """Stop the VM and remove it with its disk."""
    from .. import vmssh
    name = vm_name(name)
    status = app.call("status", name=name)
    confirm(f"Delete VM {name!r} and its disk ({status.get('state')})?", yes)
    doc = app.call("delete", name=name)
    _end_ssh_masters(app, name)
    vmssh.forget(app.target, status)
    app.out.emit(doc, f"deleted {name}")


@command("push-config")
@name_argument
@spec_options
@click.option("--no-admins", is_flag=True, help="Remove every admin (the owner stays).")
@click.option("--owner", metavar="NAME", help="Give the VM to another person (operators).")
@pass_app
def push_config(app: App, name: str, no_admins: bool, owner: str | None,
                **kw: Any) -> None:
    """Change a VM's spec or user-data (applied at its next boot); a change of its
    admins applies at once in the running guest."""
    params = spec_params(app, kw, default_key=False)
    if no_admins:
        if params.get("admins"):
            raise click.UsageError("--no-admins and --admin: give one of them")
        params["admins"] = []
    if owner:
        params["owner"] = owner
    if not params:
        raise click.UsageError("nothing to change: give at least one option")
    status = app.call("push_config", name=vm_name(name), **params)
    synced = status.get("accounts_synced")
    human = (f"{name}: configuration saved; applied at the next boot "
             f"(vmctl reboot {name})")
    if synced:
        changed = ", ".join([f"+{a}" for a in synced.get("added", [])] +
                            [f"-{a}" for a in synced.get("removed", [])])
        human += (f"; accounts changed in the running guest: {changed}" if synced.get("ok")
                  else f"; accounts not changed yet: {synced.get('error')}")
    app.out.emit(status, human)


@command()
@name_argument
@click.option("--name", "-n", "snapshot", metavar="SNAPSHOT",
              help="Snapshot name (default: chosen by the agent from the time).")
@pass_app
def snapshot(app: App, name: str, snapshot: str | None) -> None:
    """Take a live snapshot of a VM's disk and memory."""
    doc = app.call("snapshot", name=vm_name(name), snapshot=snapshot)
    snap = doc.get("snapshot") or {}
    app.out.emit(doc, f"{name}: snapshot {snap.get('name')} taken",
                 quiet=snap.get("name"))


def _snapshot_table(snaps: list[dict]) -> Any:
    from rich.table import Table
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "DATE", "VM STATE"):
        table.add_column(col)
    for s in snaps:
        table.add_row(str(s.get("name")), str(s.get("date")),
                      output.size(s.get("vm_state_size")))
    return table


@command()
@name_argument
@pass_app
def snapshots(app: App, name: str) -> None:
    """List a VM's snapshots."""
    doc = app.call("snapshots", name=vm_name(name))
    snaps = doc.get("snapshots", [])
    human: Any = ((lambda: app.out.console.print(_snapshot_table(snaps))) if snaps
                  else f"{name} has no snapshots")
    app.out.emit(doc, human, quiet="\n".join(str(s.get("name")) for s in snaps) or None)


@command()
@name_argument
@click.option("--timeout", type=click.FloatRange(1), default=600, show_default=True,
              help="Seconds to wait.")
@click.option("--login/--no-login", default=True, show_default=True,
              help="Also check that an SSH login works (needs your key in the VM).")
@click.option("--cloud-init", "cloud_init", is_flag=True,
              help="Also wait until cloud-init finished (the user-data's runcmd, "
                   "packages...).")
@pass_app
def wait(app: App, name: str, timeout: float, login: bool, cloud_init: bool) -> None:
    """Wait until a VM is ready: SSH answers and a login works (which opens the SSH
    connection later commands reuse); with --cloud-init, cloud-init finished too."""
    from .. import vmssh
    from ..progress import Progress, wait_ready
    name = vm_name(name)
    check = ((lambda st: vmssh.try_login(app.target, st, app.config, call=app.call))
             if login else None)
    with Progress(name, enabled=not app.quiet, login=login,
                  cloud_init=cloud_init) as progress:
        status = wait_ready(app.call, name, progress, timeout=timeout, login=check,
                            cloud_init=cloud_init)
    app.out.emit(status, f"{name} is ready")


COMMANDS = (list_, show, start, stop, reboot, reset, poweroff, hard_reset, delete,
            push_config, snapshot, snapshots, wait)
