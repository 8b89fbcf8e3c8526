"""psai's types as a user's script sees them: mypy run on a script outside
the checkout finds the installed psai (an editable install included), and
the public signatures catch the mistakes they can name."""
import os
import re
import subprocess
import sys

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each line marked "# error" must be an error, and only those.
SCRIPT = '''\
import psai

model = psai.resolve_model("gpt-4o")
reveal_type(model)
found, why = psai.resolve_model("gpt-4o", explain=True)
reveal_type(why)
psai.record_usage(model, tokens_in=1000, tokens_out=10, cached_tokens=200)
psai.record_usage(model, tokens_in=1000.5, tokens_out=10)  # error
rows = psai.cost_report(by="agent")
reveal_type(rows[0]["calls"])
psai.cost_report(by="tag:team")
psai.set_budget(amount=5, period="month", unpriced="allow")
psai.set_budget(amount=5, period="monthly")  # error
reveal_type(psai.__version__)
'''


def run_mypy(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    environment = {key: value for key, value in os.environ.items() if key not in ("MYPYPATH", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes",
                             "--cache-dir", str(tmp_path / "cache"), "script.py"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    found = {}
    for line in result.stdout.splitlines():
        match = re.match(r"script\.py:(\d+): (error|note): (.*)", line)
        if match:
            found.setdefault(int(match.group(1)), []).append((match.group(2), match.group(3)))
    return result, found


def test_mypy_outside_the_checkout_finds_psai_and_its_public_types(tmp_path):
    assert not str(tmp_path).startswith(CHECKOUT)
    result, found = run_mypy(tmp_path)
    assert "import-not-found" not in result.stdout, (
        "mypy cannot see the installed psai; reinstall it (make .venv/.installed, or pip install -e .): "
        + result.stdout)
    lines = SCRIPT.splitlines()
    errors = sorted(number for number, messages in found.items() if any(kind == "error" for kind, _ in messages))
    assert errors == [number for number, line in enumerate(lines, 1) if line.endswith("# error")], result.stdout
    revealed = {lines[number - 1].split("(", 1)[1].rstrip(")"): message.split('"')[1].replace("builtins.", "")
                for number, messages in found.items() for kind, message in messages
                if message.startswith("Revealed type")}
    assert revealed == {"model": "psai.models.PsAiModel", "why": "str", 'rows[0]["calls"]': "int",
                        "psai.__version__": "str"}, result.stdout
    # A report's by takes "tag:KEY" and pairs ("agent,model"): any text, checked when it runs.
    assert "Literal['monthly']" in found[13][0][1]
