"""``vmctl run``: one command in a throw-away VM (vmctl/job.py does the work).

``vmctl run --template T [--pool P] [--copy DIR] [--env K=V] [--timeout 30m]
[--artifacts PATH] [--keep-on-failure] [--json] -- COMMAND...``: everything after
``--`` (or after the first word that is not an option) is COMMAND; one word is a shell
command line as it is, several words are quoted as given. vmctl's exit code is the
command's (124: it ran out of time; 130/143: vmctl was interrupted).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vmagent.errors import VMAgentError
from vmagent.spec import parse_duration

from ..app import App, command, pass_app
from ..errors import CLIError
from .common import vm_name


def _duration(value: str | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        return float(parse_duration(value, what))
    except VMAgentError as e:
        raise CLIError(e.message, "bad_request") from None


@command("run", context_settings={"allow_interspersed_args": False})
@click.option("--template", "-t", metavar="TEMPLATE",
              help="Warm-start the job's VM from this template.")
@click.option("--pool", "-p", metavar="POOL",
              help="Take the job's VM from this warm pool (vmctl pool list).")
@click.option("--copy", "copy", metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Copy DIR's contents into the job's directory (~/job) first.")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE",
              help="An environment variable of COMMAND (repeatable).")
@click.option("--timeout", metavar="DURATION",
              help="Stop the job after this long (seconds, or 30m, 2h): exit 124.")
@click.option("--artifacts", multiple=True, metavar="PATH",
              help="Copy PATH (relative to ~/job) back after COMMAND (repeatable).")
@click.option("--artifacts-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True,
              help="Where the artifacts are copied to.")
@click.option("--keep-on-failure", is_flag=True,
              help="Keep the VM of a failed job and print how to reach it.")
@click.option("--name", metavar="NAME", help="The job VM's name (default: job-XXXXXXXX).")
@click.argument("command_", metavar="-- COMMAND...", nargs=-1, required=True)
@pass_app
def run(app: App, template: str | None, pool: str | None, copy: Path | None,
        env: tuple[str, ...], timeout: str | None, artifacts: tuple[str, ...],
        artifacts_dir: Path, keep_on_failure: bool, name: str | None,
        command_: tuple[str, ...]) -> None:
    """Run COMMAND in a fresh VM, then delete the VM (its exit code is vmctl's)."""
    from ..job import Job, JobSpec, parse_env
    if bool(template) == bool(pool):
        raise CLIError("give --template T or --pool P (one of them)", "bad_request")
    if template:
        vm_name(template)
    spec = JobSpec(command=list(command_), template=template, pool=pool, copy=copy,
                   env=parse_env(env), timeout=_duration(timeout, "--timeout"),
                   artifacts=list(artifacts), artifacts_dir=artifacts_dir,
                   keep_on_failure=keep_on_failure,
                   name=vm_name(name) if name else None)
    job = Job(app, spec)
    code = job.run()
    if job.record["kept"]:
        app.out.info(f"vmctl: {job.kept_message()}")
    if app.json:
        app.out.emit(job.record)
    sys.exit(code)


COMMANDS = (run,)
