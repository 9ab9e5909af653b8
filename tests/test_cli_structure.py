"""How vmctl is put together: commands are module-level click commands listed in each
module's COMMANDS and added by vmctl.main; no command module imports vmctl.main; every
module imports on its own (no import cycles); timeouts come from the operation table."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click
import pytest

from vmagent import ops
from vmctl import client
from vmctl.main import cli

ROOT = Path(__file__).resolve().parents[1]
COMMAND_MODULES = sorted(p for p in (ROOT / "vmctl" / "commands").glob("*.py")
                         if p.name != "__init__.py")
HELPERS = ("common", "specopts")      # shared by commands; no commands of their own
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                 for p in (ROOT / "vmctl").rglob("*.py") if p.name != "__init__.py")


def _imports_outside_main_guard(tree: ast.Module):
    """Import nodes, skipping the body of ``if __name__ == "__main__":``."""
    def guarded(node: ast.AST) -> bool:
        return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if guarded(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


@pytest.mark.parametrize("path", COMMAND_MODULES, ids=lambda p: p.name)
def test_command_modules_do_not_import_main_or_register(path):
    tree = ast.parse(path.read_text())
    for node in _imports_outside_main_guard(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [f"{'.' * node.level}{node.module or ''}"])
        assert not [n for n in names if n in ("..main", "vmctl.main")], \
            f"{path.name}:{node.lineno} imports vmctl.main"
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "register" not in functions


def test_main_names_every_listed_command_with_its_module():
    import importlib

    from vmctl.main import COMMANDS
    listed = {}
    for path in COMMAND_MODULES:
        module = importlib.import_module(f"vmctl.commands.{path.stem}")
        if path.stem in HELPERS:
            continue
        assert module.COMMANDS, path.name
        listed.update({c.name: path.stem for c in module.COMMANDS})
    assert listed == COMMANDS
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == list(COMMANDS)
    for name, stem in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
        assert command.callback.__module__ == f"vmctl.commands.{stem}"
    assert cli.get_command(ctx, "no-such-command") is None


def test_every_module_imports_alone():
    """Each module first in a fresh interpreter: an import cycle fails here."""
    code = ("import importlib, subprocess, sys\n"
            "bad = []\n"
            "for m in sys.argv[1:]:\n"
            "    p = subprocess.run([sys.executable, '-c', f'import {m}'],"
            " capture_output=True, text=True)\n"
            "    if p.returncode: bad.append((m, p.stderr.strip().splitlines()[-1:]))\n"
            "print(bad)\n")
    proc = subprocess.run([sys.executable, "-c", code, *MODULES], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert "vmctl.app" in MODULES and "vmctl.commands.vm" in MODULES


@pytest.mark.parametrize("op, params, seconds", [
    ("status", {"name": "a"}, ops.get("status").timeout),
    ("create", {"name": "a"}, 900.0),
    ("shutdown", {"name": "a"}, 300.0),
    ("shutdown", {"name": "a", "timeout": 30}, 300.0),      # the row's, when longer
    ("shutdown", {"name": "a", "timeout": 600}, 600 + client.TIMEOUT_MARGIN),
    ("template_create", {"template": "t", "timeout": 1200}, 1320.0),
    ("template_create", {"template": "t", "timeout": 3000}, 3000 + client.TIMEOUT_MARGIN),
])
def test_client_waits_as_long_as_the_table_says(op, params, seconds):
    assert client.wait_for(op, params) == seconds


def test_no_command_hard_codes_an_operation_timeout():
    for path in (ROOT / "vmctl").rglob("*.py"):
        assert "call_timeout=" not in path.read_text() or path.name == "client.py", path
