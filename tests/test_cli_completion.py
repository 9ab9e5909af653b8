"""The completion scripts in completions/ are what ``vmctl completion SHELL`` prints."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vmctl.commands.completion import FILES, SHELLS, script
from vmctl.main import cli

COMPLETIONS = Path(__file__).resolve().parents[1] / "completions"


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_scripts_are_current(shell):
    committed = (COMPLETIONS / FILES[shell]).read_text()
    assert committed == script(cli, shell), (
        f"completions/{FILES[shell]} is stale: run 'python -m vmctl.gen_completions'")
    result = CliRunner().invoke(cli, ["completion", shell])
    assert result.exit_code == 0 and result.stdout == committed


def test_completes_commands_and_options(monkeypatch):
    from click.shell_completion import ShellComplete
    comp = ShellComplete(cli, {}, "vmctl", "_VMCTL_COMPLETE")
    names = [c.value for c in comp.get_completions([], "sn")]
    assert names == ["snapshot", "snapshots"]
    opts = [c.value for c in comp.get_completions(["create", "x"], "--no-")]
    assert set(opts) >= {"--no-wait", "--no-start"}


def test_vm_names_complete_silently_without_agent(monkeypatch, tmp_path):
    from click.shell_completion import ShellComplete
    monkeypatch.setenv("VMCTL_AGENT", f"unix://{tmp_path}/none.sock")
    comp = ShellComplete(cli, {}, "vmctl", "_VMCTL_COMPLETE")
    assert comp.get_completions(["show"], "") == []
