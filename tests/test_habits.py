"""The project's habits, checked on every `make test`: ruff finds nothing,
mypy finds nothing in psai, and docs/cli.md's reference is what cog would
generate from --help today. Each runs the tool the test extras install next to
this Python, from the project's root (its settings are in pyproject.toml)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_tool(*args):
    """``python -m TOOL ARGS`` from the root; the result, output and errors together."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)


def test_ruff_finds_nothing():
    result = run_tool("ruff", "check", "--no-fix", "psai", "tests", "bench", "docs")
    assert result.returncode == 0, "ruff check psai tests bench docs:\n" + result.stdout


def test_mypy_finds_nothing_in_psai():
    result = run_tool("mypy", "psai")
    assert result.returncode == 0, "mypy psai:\n" + result.stdout


def test_cli_reference_in_docs_is_up_to_date():
    result = run_tool("cogapp", "--check", "--diff", "docs/cli.md")
    assert result.returncode == 0, "docs/cli.md is stale: run `make docs` (cog -r docs/cli.md):\n" + result.stdout
