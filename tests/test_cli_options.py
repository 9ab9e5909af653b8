"""--json, --quiet/-q and --host/-H: the same before and after the command, on every
command and subcommand, against a real agent (CliRunner); a conflicting --host is a
usage error; nothing after ``--`` of ``vmctl ssh`` is read by vmctl."""

from __future__ import annotations

import json
import re

import click
import pytest

from cli_helpers import (DRY, golden_key, GOLDEN_KEY, agent, check_golden, ensure_test_image,  # noqa: F401
                         home, local, normalize, run)
from vmctl.app import App
from vmctl.commands.ssh import command_start, ssh as ssh_command
from vmctl.main import cli

GLOBAL = {"--host", "--json", "--quiet"}


def _commands(group: click.Group, path=()):
    for name, cmd in group.commands.items():
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


def test_every_command_and_group_takes_the_global_options():
    names = []
    for path, cmd in _commands(cli):
        opts = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
        assert GLOBAL <= opts and {"-H", "-q"} <= opts, " ".join(path)
        names.append(" ".join(path))
    assert {"list", "show", "create", "ssh", "image list", "host show",
            "template rm"} <= set(names)


_key = golden_key


@pytest.mark.parametrize("spelling", ["before", "after", "both"])
def test_dry_run_json_golden_in_every_spelling(local, agent, home, spelling):
    ensure_test_image(local)
    (home / "ud.yaml").write_text("packages: [htop]\n")
    args = [*DRY, "--ssh-key", _key(home), "--user-data", home / "ud.yaml"]
    args = {"before": ["--json", *args], "after": [*args, "--json"],
            "both": ["--json", *args, "--json"]}[spelling]
    result = local(*args)
    assert result.exit_code == 0, result.stderr
    check_golden("create_dry_run.json", normalize(result.stdout, agent))


# what changes between two calls by itself: other processes write to the disk, and the
# host's VMs (of other tests on this agent) start, stop or are restarted by their policy
# meanwhile, which moves the counts and the allocation of the host report
_VOLATILE = {"disk_free", "allocated", "vms", "resources", "in_flight"}


def _stable(text: str):
    def strip(doc):
        if isinstance(doc, dict):
            return {k: strip(v) for k, v in doc.items()      # a list of VMs is kept
                    if k not in _VOLATILE or isinstance(v, list)}
        if isinstance(doc, list):
            return [strip(v) for v in doc]
        return doc
    try:
        return strip(json.loads(text))
    except ValueError:
        return text


def _same(local, before: list[str], after: list[str]) -> str:
    a, b = local(*before), local(*after)
    assert (a.exit_code, _stable(a.stdout)) == (b.exit_code, _stable(b.stdout)), (
        before, after)
    assert a.exit_code == 0, a.stderr
    return a.stdout


@pytest.mark.parametrize("words", [["list"], ["image", "list"], ["host", "show"],
                                   ["template", "list"]])
def test_json_before_and_after_the_command(local, words):
    out = _same(local, ["--json", *words], [*words, "--json"])
    json.loads(out)
    if len(words) == 2:           # on the group too: vmctl image --json list
        assert _stable(local(words[0], "--json", words[1]).stdout) == _stable(out)


def test_the_json_documents_are_the_agents(local, agent):
    doc = json.loads(_same(local, ["--json", "host", "show"], ["host", "show", "--json"]))
    assert doc["state_dir"] == str(agent.state_dir) and doc["accel"]["name"] == "tcg"
    ensure_test_image(local)
    images = json.loads(_same(local, ["--json", "image", "list"],
                              ["image", "list", "--json"]))
    assert "test" in [i["name"] for i in images["images"]]


def test_quiet_before_and_after_the_command(local, agent, home):
    version = json.loads(local("--json", "host", "show").stdout)["version"]
    assert _same(local, ["-q", "host", "show"], ["host", "show", "-q"]) == version + "\n"
    assert local("host", "show", "--quiet").stdout == version + "\n"
    ensure_test_image(local)
    before = local("-q", *DRY, "--ssh-key", _key(home))
    after = local(*DRY, "--ssh-key", _key(home), "-q")
    assert before.exit_code == after.exit_code == 0, (before.stderr, after.stderr)
    argv = normalize(before.stdout, agent)
    assert argv == normalize(after.stdout, agent)       # the MAC and port are random
    assert argv.startswith("qemu-system-x86_64 -name gold1,debug-threads=on ")


def test_host_before_and_after_the_command(run, agent):
    out = _same(run, ["-H", agent.unix, "--json", "host", "show"],
                ["host", "show", "-H", agent.unix, "--json"])
    assert json.loads(out)["state_dir"] == str(agent.state_dir)
    listing = _same(run, ["--host", agent.unix, "list", "--json"],
                    ["list", "--json", "--host", agent.unix])
    assert "vms" in json.loads(listing)
    # the same agent given twice (before and after) is fine
    assert run("-H", agent.unix, "list", "-H", agent.unix, "-q").exit_code == 0
    # create's --host is the global one
    assert run("create", "h1", "-H", agent.unix, "--image", "nope",
               "--dry-run").exit_code == 3


def test_conflicting_hosts_are_a_usage_error(run, agent):
    result = run("-H", agent.unix, "list", "--host", agent.http)
    assert result.exit_code == 2
    assert "--host given twice with different values" in result.stderr
    assert agent.unix in result.stderr and agent.http in result.stderr
    as_json = run("--json", "-H", agent.unix, "list", "--host", agent.http)
    assert as_json.exit_code == 2 and json.loads(as_json.stdout)["error"] == "usage"
    again = run("list", "-H", agent.unix, "-H", agent.http)          # both after
    assert again.exit_code == 2 and "twice" in again.stderr


def test_an_option_after_the_command_failing_to_parse_is_still_json(local):
    result = local("list", "--json", "--bogus")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"] == "usage"


# --- vmctl ssh: its options end where COMMAND begins ---------------------------------

def _ssh_parse(args: list[str]):
    root = click.Context(cli, info_name="vmctl", obj=App())
    ctx = ssh_command.make_context("ssh", list(args), parent=root)
    return ctx.params, root.obj


@pytest.mark.parametrize("args, command, quiet, host", [
    (["dev1", "--", "true", "--json", "-q", "-H", "x"], ("true", "--json", "-q", "-H", "x"),
     False, None),
    (["dev1", "-q", "--", "true"], ("true",), True, None),
    (["-q", "dev1", "-H", "h1", "--", "ls", "-l"], ("ls", "-l"), True, "h1"),
    (["dev1", "grep", "-q", "x", "--", "-y"], ("grep", "-q", "x", "--", "-y"), False, None),
    (["dev1", "-H", "h1", "uname", "-r"], ("uname", "-r"), False, "h1"),
    (["dev1", "--host=h1", "-qt", "top"], ("top",), True, "h1"),
    (["dev1"], (), False, None),
])
def test_ssh_reads_its_options_only_before_the_command(args, command, quiet, host):
    params, app = _ssh_parse(args)
    assert params["name"] == "dev1" and params["command"] == command
    assert (app.quiet, app.host, app.json) == (quiet, host, False)


def test_ssh_command_start():
    ctx = click.Context(ssh_command)
    assert command_start(ssh_command, ctx, ["dev1", "echo", "-t"]) == 1
    assert command_start(ssh_command, ctx, ["-t", "dev1", "--", "x"]) == 2
    assert command_start(ssh_command, ctx, ["-H", "h", "dev1"]) is None


def test_ssh_unknown_option_before_the_separator_is_refused(run):
    result = run("ssh", "dev1", "--bogus", "--", "true")
    assert result.exit_code == 2 and "--bogus" in result.stderr
