"""The documentation site: every Python block of every page runs, and the site builds strictly.

Each ``docs/*.md`` page runs its fenced blocks whose info string is exactly ``python`` (and
``python tltorch``, when tltorch is installed) in order, in one namespace per page, in a
temporary working directory. ``mkdocs build --strict`` must succeed, and every page must be
in the ``nav`` of ``mkdocs.yml``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
# An opening fence and its info string; the block runs up to the next closing fence.
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", flags=re.M | re.S)
HAS_TLTORCH = importlib.util.find_spec("tltorch") is not None


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(info string, code, line number of the opening fence)`` of every fenced block."""
    return [
        (m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


def runnable(page: Path) -> list[tuple[str, str, int]]:
    return [b for b in code_blocks(page.read_text()) if b[0] in ("python", "python tltorch")]


def test_docs_pages_exist():
    names = {p.stem for p in PAGES}
    guide = {"formats", "ranks", "planner", "compress", "calibration", "export", "migration"}
    assert {"index", "api", *guide} <= names


def test_fence_parser_finds_blocks_and_their_info_strings():
    text = "intro\n```python\na = 1\n```\n\n```bash\nls\n```\n```python tltorch\nb = 2\n```\n"
    assert code_blocks(text) == [
        ("python", "a = 1\n", 2),
        ("bash", "ls\n", 6),
        ("python tltorch", "b = 2\n", 9),
    ]


def run_page(page: Path, with_tltorch: bool) -> None:
    """Run the page's blocks in order in one namespace (cwd: the caller's tmp_path)."""
    namespace = {"__name__": "__main__"}
    for info, code, line in runnable(page):
        if info == "python tltorch" and not with_tltorch:
            continue
        # Padding keeps tracebacks pointing at the right line of the page.
        source = "\n" * line + code
        context = contextlib.nullcontext()
        if info == "python tltorch":
            import tensorly  # a tltorch dependency

            # What `import tltorch` gives a user, also if it was imported (and the backend
            # restored) earlier in this session; the backend is restored after the block.
            context = tensorly.backend_context("pytorch")
        try:
            with context:
                exec(compile(source, str(page), "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page.name}, block at line {line} ({info}) failed") from exc


CODE_PAGES = [p for p in PAGES if runnable(p)]  # api.md is only mkdocstrings directives


@pytest.mark.parametrize("page", CODE_PAGES, ids=[p.stem for p in CODE_PAGES])
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    blocks = runnable(page)
    monkeypatch.chdir(tmp_path)  # files written by the examples land here
    run_page(page, with_tltorch=HAS_TLTORCH)
    if not HAS_TLTORCH and any(info == "python tltorch" for info, _, _ in blocks):
        # tltorch is a test extra; where it is missing the page's other blocks did run.
        pytest.skip("tltorch is not installed: its blocks were not run (the others passed)")


TLTORCH_PAGES = [p for p in PAGES if any(b[0] == "python tltorch" for b in runnable(p))]


@pytest.mark.parametrize("page", TLTORCH_PAGES, ids=[p.stem for p in TLTORCH_PAGES])
def test_page_runs_without_its_tltorch_blocks(page, tmp_path, monkeypatch):
    """Where tltorch is missing the page's plain blocks must still run on their own."""
    monkeypatch.chdir(tmp_path)
    run_page(page, with_tltorch=False)


TLTORCH_IMPORT = re.compile(r"^\s*(?:import|from)\s+tltorch\b", flags=re.M)


def test_tltorch_blocks_only_where_marked():
    """Plain ``python`` blocks never import tltorch (they must run without it), and every
    ``python tltorch`` block is on a page whose first tltorch block imports it."""
    assert TLTORCH_IMPORT.search("x = 1\n  from tltorch import FactorizedLinear\n")
    assert not TLTORCH_IMPORT.search("# from tltorch import FactorizedLinear\n")
    for page in PAGES:
        marked = []
        for info, code, line in code_blocks(page.read_text()):
            if info == "python":
                assert not TLTORCH_IMPORT.search(code), f"{page.name}:{line} imports tltorch"
            elif info == "python tltorch":
                marked.append(code)
        if marked:
            assert TLTORCH_IMPORT.search(marked[0]), f"{page.name}: first tltorch block"


def _nav_files(entry) -> list[str]:
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, list):
        return [f for item in entry for f in _nav_files(item)]
    if isinstance(entry, dict):
        return [f for value in entry.values() for f in _nav_files(value)]
    return []


def test_every_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == pages, f"nav {sorted(nav)} vs pages {pages}"
    assert len(nav) == len(set(nav)), f"a page is listed twice: {nav}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    # No -q: with it, mkdocs drops warnings before --strict counts them and exits 0.
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
    cmd += ["-d", str(tmp_path / "site")]
    env = {**os.environ, "NO_COLOR": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    assert not warnings, "\n".join(warnings)
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    # mkdocstrings rendered the reference (not left the ::: lines as text), and docs/hooks.py
    # dropped the Sphinx role names of the docstrings.
    assert 'id="tensorized.FactorizedLinear"' in api
    assert 'id="tensorized.save_model"' in api
    assert ":::" not in api
    assert not re.search(r":(func|class|meth|mod|attr):<code>", api)
    # ```python tltorch blocks are rendered as Python code, not as stray text.
    migration = (site / "migration" / "index.html").read_text()
    assert "python tltorch" not in migration
    assert re.search(r'<code class="language-python">import math\s+import warnings', migration)
