"""``python -m vmctl.gen_completions``: rewrite the shell completion scripts in
``completions/`` (tests/test_cli_completion.py checks they are current)."""

from pathlib import Path

from vmctl.commands.completion import write_all
from vmctl.main import cli

if __name__ == "__main__":
    write_all(cli, Path(__file__).resolve().parents[1] / "completions")
