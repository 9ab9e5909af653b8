"""Start-up cost: what a vmctl command imports before its first request.

``vmctl --version``, ``vmctl list --json`` and ``vmctl ssh NAME -- true`` must not import
the heavy modules (each costs tens of milliseconds): they are imported where a command
needs them (rich to draw for people, paramiko for ssh:// agents, aiohttp for websockets,
yaml for user-data, click's completion for ``vmctl completion``). Checked in a fresh
interpreter running ``python -m vmctl ARGS``, which writes the names in ``sys.modules`` at
its exit (``-X importtime`` would not do: it does not list what ``importlib.import_module``
loads, which is how vmctl.main loads the named command's module).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("rich", "paramiko", "yaml", "cryptography", "aiohttp", "click.shell_completion")


def imported(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, set]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMCTL_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / ".config"),
               VMCTL_AGENT=f"unix://{tmp_path}/none.sock")
    out = tmp_path / "modules.json"
    env["MODULES_OUT"] = str(out)
    code = ("import atexit, json, os, runpy, sys\n"
            "atexit.register(lambda: open(os.environ['MODULES_OUT'], 'w')"
            ".write(json.dumps(list(sys.modules))))\n"
            "sys.argv = ['vmctl', *sys.argv[1:]]\n"
            "runpy.run_module('vmctl', run_name='__main__', alter_sys=True)\n")
    proc = subprocess.run([sys.executable, "-c", code, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return proc, set(json.loads(out.read_text()))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("args, exit_code", [
    (["--version"], 0),
    (["list", "--json"], 6),                      # no agent: fails at the first request
    (["--json", "list"], 6),
    (["ssh", "dev1", "--", "true"], 6),
    (["show", "dev1", "-q"], 6),
])
def test_no_heavy_module_before_the_first_request(tmp_path, args, exit_code):
    proc, modules = imported(args, tmp_path)
    assert proc.returncode == exit_code, proc.stderr[-2000:]
    assert "vmctl.main" in modules                # the listing is real
    assert heavy(modules) == [], f"vmctl {' '.join(args)} imported {heavy(modules)}"


def test_version_imports_no_agent_client(tmp_path):
    proc, modules = imported(["--version"], tmp_path)
    assert proc.stdout.startswith("vmctl ")
    assert not modules & {"http.client", "vmctl.client", "vmagent.ops", "tomllib",
                          "asyncio", "subprocess"}


def test_the_check_sees_a_heavy_import(tmp_path):
    """The check itself can fail: `vmctl completion` does import click's completion."""
    proc, modules = imported(["completion", "bash"], tmp_path)
    assert proc.returncode == 0
    assert "click.shell_completion" in heavy(modules)


@pytest.mark.parametrize("args", [["list", "--json"], ["ssh", "dev1", "--", "true"]])
def test_one_agent_needs_no_placement_machinery(tmp_path, args):
    """Placement across hosts (a thread pool, vmagent.alloc's ranking) is imported only
    where a create is placed or several hosts are asked."""
    proc, modules = imported(args, tmp_path)
    assert proc.returncode == 6, proc.stderr[-2000:]
    assert not {m for m in modules if m.startswith(("concurrent", "vmagent.alloc"))}


@pytest.mark.parametrize("args, wanted", [
    (["--version"], set()),
    (["list", "--json"], {"vm"}),
    (["ssh", "dev1", "--", "true"], {"ssh"}),
])
def test_only_the_named_commands_module_is_imported(tmp_path, args, wanted):
    proc, modules = imported(args, tmp_path)
    assert proc.returncode in (0, 6), proc.stderr[-2000:]
    commands = {m.rsplit(".", 1)[1] for m in modules if m.startswith("vmctl.commands.")}
    assert commands - {"common", "specopts"} == wanted, commands
