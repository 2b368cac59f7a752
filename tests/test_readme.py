"""The README's quick start is two commands, and the first one's pruning step runs here as a test; its usage block
shows exactly the options the CLI has."""
import re
import shlex
import shutil

import click
import pytest
from builders import ROOT
from click.testing import CliRunner

from onnxprune.cli import cli


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_install_and_test():
    first, second = quick_start()
    assert first.startswith("pip install . && onnxprune ")
    assert second == "pip install '.[test]' && pytest -q"
    assert "pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_quick_start_prune_runs(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "models", tmp_path / "models", ignore=shutil.ignore_patterns("zoo"))
    monkeypatch.chdir(tmp_path)
    args = shlex.split(quick_start()[0].split("&&", 1)[1])[1:]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    accuracy = re.search(r"top-1 accuracy  0.9963 -> (0\.\d+)", result.output)
    assert accuracy and float(accuracy.group(1)) >= 0.98, result.output
    assert (tmp_path / "models" / "digits_cnn.pruned.onnx").exists()


def usage_options() -> dict[str, dict[str, str]]:
    """Per CLI command, the options its lines in the README's usage block show, each with the value written after it
    (`l1|l2|...` for a choice). A line starting `onnxprune SUBCOMMAND` begins that command, `onnxprune IN.onnx` the
    prune command; indented lines continue the one above."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Usage\s+```\n(.*?)```", text, re.S).group(1)
    shown: dict[str, dict[str, str]] = {name: {} for name in cli.commands}
    command = "prune"
    for line in block.splitlines():
        if line.startswith("onnxprune "):
            word = line.split()[1]
            command = word if word in cli.commands else "prune"
        for option, value in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)(?: ([^\s\[\]]+))?", line):
            shown[command][option] = value
    return shown


def options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option)]


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_in_the_usage_block_exists(name):
    known = {opt for option in options(cli.commands[name]) for opt in option.opts}
    assert set(usage_options()[name]) - known == set()


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_cli_option_is_in_the_usage_block(name):
    shown = usage_options()[name]
    assert [o.opts[0] for o in options(cli.commands[name]) if not set(o.opts) & set(shown)] == []


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_choices_in_the_usage_block_are_the_cli_choices(name):
    shown = usage_options()[name]
    listed = {opt: (sorted(shown[opt].split("|")), sorted(o.type.choices)) for o in options(cli.commands[name])
              if isinstance(o.type, click.Choice) for opt in o.opts if "|" in shown.get(opt, "")}
    assert {opt: pair for opt, pair in listed.items() if pair[0] != pair[1]} == {}
