"""Every ```python block in README.md and docs/*.md runs, in order, per page,
against a fresh database of each kind (``$PSAI_DATABASE_URL``)."""
import pathlib
import re

import pytest

from conftest import make_backend

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page):
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_examples_run(page, kind, tmp_path, monkeypatch):
    backend = make_backend(kind, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PSAI_DATABASE_URL", backend.url)
    namespace = {"__name__": "docs_example"}
    try:
        for number, source in enumerate(python_blocks(page), 1):
            code = compile(source, "%s (block %d)" % (page.name, number), "exec")
            exec(code, namespace)
    finally:
        backend.close()


def test_every_doc_page_has_runnable_examples():
    for page in PAGES:
        if page.name not in ("cli.md", "performance.md", "reliability.md"):
            assert python_blocks(page), "%s has no ```python example" % page.name
