"""Checks that every internal link of the built site resolves: ``python docs/check_links.py``.

Every ``href`` and ``src`` of every HTML page under ``docs/_build/html`` (or the folder
given) that points inside the site must name an existing file, and its ``#fragment``, if
any, an ``id`` (or ``name``) on that page. External links (``http:``, ``https:``,
``mailto:``) are not fetched: the site builds and checks offline. Exit status 1, listing
the broken links, when any is broken.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.anchors: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is None:
                continue
            if name in ("href", "src"):
                self.links.append(value)
            if name == "id" or (tag == "a" and name == "name"):
                self.anchors.add(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def broken_links(site: Path) -> list[str]:
    """``"page: link"`` for every internal link of ``site`` that does not resolve."""
    pages = {path.resolve(): _parse(path) for path in site.rglob("*.html")}
    broken = []
    for path, page in sorted(pages.items()):
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith("javascript:"):
                continue  # external, not fetched
            target = path if not parts.path else (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{path.relative_to(site.resolve())}: {link}")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html":
                anchors = (pages.get(target) or _parse(target)).anchors
                if fragment not in anchors:
                    broken.append(f"{path.relative_to(site.resolve())}: {link} (no #{fragment})")
    return broken


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    site = Path(args[0]) if args else Path(__file__).resolve().parent / "_build" / "html"
    if not (site / "index.html").is_file():
        print(f"{site}: no built site (run `make docs`)", file=sys.stderr)
        return 2
    broken = broken_links(site)
    pages = sum(1 for _ in site.rglob("*.html"))
    for line in broken:
        print(f"broken link: {line}", file=sys.stderr)
    print(f"{pages} pages, {len(broken)} broken internal links")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
