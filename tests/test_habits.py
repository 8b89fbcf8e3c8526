"""The project's habits, checked on every `make test`: ruff finds nothing,
mypy finds nothing in psai, and docs/cli.md's reference and tutorial are what
cog would generate from --help and the commands today. Each runs the tool the test extras install next to
this Python, from the project's root (its settings are in pyproject.toml)."""
import importlib.util
import pathlib
import shlex
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


def test_the_cli_tutorial_is_generated_and_runs_on_its_own_files():
    """docs/cli.md's tutorial is what its commands print (the check above
    holds it to that): ``init`` lists every migration; and every database it
    names is a SQLite file of its own temporary directory, never the suite's
    or the reader's PostgreSQL."""
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "cli_reference.py")
    cli_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_reference)
    page = (ROOT / "docs" / "cli.md").read_text()
    generated = page.split("## A short tutorial", 1)[1].split("[[[end]]]", 1)[0]
    migrations = sorted(path.stem for path in (ROOT / "psai" / "migrations").glob("0*.py"))
    assert "applied: %s\n" % ", ".join(migrations) in generated
    urls = [word.partition("=")[2] or word for step in cli_reference.TUTORIAL for word in shlex.split(step)
            if "://" in word]
    assert urls and all(url.startswith("sqlite:///") and not url.startswith("sqlite:////") for url in urls), urls
    assert "postgresql://" not in generated
