"""The docs' link checker (``docs/check_links.py``, run by ``make docs`` after the build)
finds broken internal links and leaves external ones alone; on a small site, no Sphinx."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "check_links.py"
spec = importlib.util.spec_from_file_location("check_links", SCRIPT)
check_links = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_links)


def test_the_checker_finds_missing_pages_and_anchors(tmp_path):
    (tmp_path / "api").mkdir()
    (tmp_path / "index.html").write_text(
        '<a href="api/layers.html#pyro_lunet.LULinear">ok</a>'
        '<a href="api/layers.html#nowhere">no anchor</a>'
        '<a href="missing.html">no page</a>'
        '<a href="https://pyro.ai">external</a><a href="#top">self</a><p id="top"></p>'
        '<img src="_images/map.png">'
    )
    (tmp_path / "api" / "layers.html").write_text(
        '<dt id="pyro_lunet.LULinear"></dt><a href="../index.html#top">up</a>'
    )
    broken = check_links.broken_links(tmp_path)
    assert sorted(broken) == [
        "index.html: _images/map.png",
        "index.html: api/layers.html#nowhere (no #nowhere)",
        "index.html: missing.html",
    ]
    (tmp_path / "_images").mkdir()
    (tmp_path / "_images" / "map.png").write_bytes(b"")
    assert check_links.main([str(tmp_path)]) == 1
    (tmp_path / "index.html").write_text(
        '<a href="api/layers.html#pyro_lunet.LULinear">ok</a><p id="top">'
    )
    assert check_links.main([str(tmp_path)]) == 0
