"""The README's quick start is two commands; the first one's pruning step runs here as a test."""
import re
import shlex
import shutil
from pathlib import Path

from click.testing import CliRunner

from onnxprune.cli import cli

ROOT = Path(__file__).resolve().parent.parent


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
