"""The docs' browser check (``docs/browser_check.py``, run by ``make docs-browser``) finds, in
headless Chromium, the broken internal links, the missing fragments, the JavaScript errors and
the blank screenshots of a small hand-written site, and passes it once fixed; no Sphinx.

Skipped where Chromium, its driver or Selenium is missing: ``make test`` may run before
``make docs-browser`` installs them, and that target runs this file again afterwards."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "browser_check.py"
spec = importlib.util.spec_from_file_location("browser_check", SCRIPT)
browser_check = importlib.util.module_from_spec(spec)
sys.modules["browser_check"] = browser_check  # its dataclasses look their module up there
spec.loader.exec_module(browser_check)

missing = browser_check.missing_tools()
pytestmark = pytest.mark.skipif(bool(missing), reason=f"no {', '.join(missing)} installed")

# Enough text and colour that a screenshot of it is a real picture.
BODY = "".join(
    f'<p style="color: hsl({7 * i}, 70%, 40%); font: 20px serif">line {i} of the page</p>'
    for i in range(40)
)


def _page(title: str, body: str) -> str:
    return f"<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>"


def _site(root: Path, index_links: str, script: str = "") -> None:
    (root / "api").mkdir(exist_ok=True)
    (root / "index.html").write_text(_page("Index", index_links + BODY + script))
    (root / "api" / "layers.html").write_text(
        _page(
            "Layers", '<h1 id="lu">LU</h1><a name="old-anchor"></a><a href="../index.html">up</a>'
        )
        + BODY
    )
    (root / "notes.txt").write_text("a file that is not a page\n")


def test_the_browser_check_finds_broken_links_and_errors(tmp_path):
    site = tmp_path / "html"
    site.mkdir()
    # A link a script adds counts too: the check reads the links after the page's scripts.
    added = (
        "<script>const a = document.createElement('a'); a.href = 'api/layers.html#added';"
        "document.body.append(a); undefinedFunction();</script>"
    )
    _site(
        site,
        '<a href="api/layers.html#lu">ok</a><a href="api/layers.html#old-anchor">old</a>'
        '<a href="api/layers.html#nowhere">no anchor</a><a href="missing.html">no page</a>'
        '<a href="gone.txt">no file</a><a href="notes.txt">file</a>'
        '<a href="https://pyro.ai">external</a><a href="#top">self</a><p id="top"></p>',
        added,
    )
    (site / "blank.html").write_text(_page("Blank", ""))
    report = browser_check.check_site(site, tmp_path / "shots", ("index.html", "blank.html"))
    problems = sorted(report.problems)
    assert problems[2].startswith("index.html: console error: ")
    assert "undefinedFunction" in problems.pop(2)
    assert problems == [
        "index.html: api/layers.html#added (no element with id 'added')",
        "index.html: api/layers.html#nowhere (no element with id 'nowhere')",
        "index.html: gone.txt (answers 404)",
        "index.html: missing.html (does not load (HTTP 404))",
        f"screenshot {tmp_path / 'shots' / 'blank.png'} is only "
        f"{(tmp_path / 'shots' / 'blank.png').stat().st_size} bytes: a blank page?",
    ]
    assert report.pages == 4  # index, layers, blank and the missing page, each loaded once

    # Fixed: no problem, exit status 0, both screenshots real pictures.
    _site(site, '<a href="api/layers.html#lu">ok</a><a href="notes.txt">file</a>')
    shots = tmp_path / "fixed"
    assert browser_check.main([str(site), "--screenshots", str(shots)]) == 0
    assert sorted(path.name for path in shots.iterdir()) == ["api_layers.png", "index.png"]


def test_no_site_is_an_error(tmp_path):
    assert browser_check.main([str(tmp_path)]) == 2
