"""Checks the built site in a real headless browser: ``python docs/browser_check.py``.

Where ``check_links.py`` parses the HTML, this loads every page of ``docs/_build/html`` (or
the folder given) in headless Chromium through Selenium and looks at what the browser made of
it, after the theme's JavaScript ran:

* every ``a[href]`` of every page (``document.links``) that points inside the site must load:
  a page with HTTP 200 and a non-empty title, its ``#fragment``, if any, an element of that
  page's DOM (``getElementById``, or an ``<a name>``); a link to a file that is not a page
  (``_sources/*.txt``, an image) must answer 200;
* no page may log a JavaScript error (a SEVERE console entry);
* screenshots of the index and of one API page are saved (``--screenshots``, by default
  ``docs/_build/screenshots``) and must be real pictures: more than a few KB, many colours.

Each distinct page is loaded once. Nothing outside the site is fetched: the browser resolves
no host but 127.0.0.1, so external links are left alone and an external script (the MathJax
the API pages ask a CDN for) fails fast, which is not counted against the site. Exit status 1,
listing the problems, when there is any; 0 with a one-line summary otherwise; 2 when there is
no built site or no browser (Debian: ``apt-get install chromium chromium-driver``; and
``pip install selenium``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

HERE = Path(__file__).resolve().parent
# The front page and the page documenting the layers (LULinear, lu_linear and the others).
SCREENSHOT_PAGES = ("index.html", "api/layers.html")
# A rendered docs page at 1280 x 1024 is a PNG of well over 50 KB with thousands of colours;
# a blank or nearly blank one is a few KB and a handful of colours.
MIN_SCREENSHOT_BYTES = 10_000
MIN_SCREENSHOT_COLOURS = 64
# Link targets with these suffixes are pages, loaded in the browser; anything else (a source
# listing, an image, a notebook download) is only asked for, so that a download never starts.
PAGE_SUFFIXES = {"", ".html", ".htm"}

# What a loaded page is, read in the page itself once its scripts ran.
_READ_PAGE = """
const nav = performance.getEntriesByType('navigation')[0];
const ids = Array.from(document.querySelectorAll('[id]'), e => e.id);
const names = Array.from(document.querySelectorAll('a[name]'), e => e.name);
return {
  status: nav ? nav.responseStatus : 0,
  url: location.href,
  title: document.title,
  links: Array.from(document.links, a => a.href),
  anchors: ids.concat(names),
};
"""
# The status of a non-page target, asked for from the page that links to it (same origin).
_HEAD = """
const [url, done] = arguments;
fetch(url, {method: 'HEAD', cache: 'no-store'}).then(r => done(r.status), e => done(String(e)));
"""


def missing_tools(chromium: str | None = None, chromedriver: str | None = None) -> list[str]:
    """What of Chromium, its driver and Selenium is not installed (empty when all are)."""
    missing = []
    if not (chromium or _find_chromium()):
        missing.append("chromium")
    if not (chromedriver or shutil.which("chromedriver")):
        missing.append("chromedriver")
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium")
    return missing


def _find_chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome")
    return next((path for path in map(shutil.which, names) if path), None)


@dataclass
class Report:
    pages: int = 0
    links: int = 0
    fragments: int = 0
    external_loads: int = 0
    screenshots: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.pages} pages, {self.links} internal links ({self.fragments} with a "
            f"#fragment), {len(self.screenshots)} screenshots, {len(self.problems)} problems, "
            f"{self.external_loads} external loads not fetched, in {self.seconds:.1f} s"
        )


@dataclass
class _Page:
    error: str | None = None
    anchors: set[str] = field(default_factory=set)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def send_head(self):
        # The browser asks for /favicon.ico by itself; a site without one is not broken, and
        # its 404 would show as a console error on the first page.
        if self.path == "/favicon.ico" and not (Path(self.directory) / "favicon.ico").exists():
            self.send_response(204)
            self.end_headers()
            return None
        return super().send_head()


@contextmanager
def _serve(site: Path):
    """The site over HTTP on 127.0.0.1, on a free port: as it is served for real.

    Over file:// each page would be its own opaque origin and a missing page a browser error
    page rather than a 404; over HTTP the navigation's response status says whether the page
    loaded, and a non-page target can be asked for from the page with fetch().
    """
    handler = functools.partial(_Quiet, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def _browser(chromium: str, chromedriver: str):
    # Never let Selenium Manager download a driver or a browser: the system's are given.
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,1024",
        # Offline and deterministic: every host but the local server fails at once.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _load(driver, url: str) -> dict | str:
    """The page at ``url`` as the browser has it, or why it did not load."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(url)
        WebDriverWait(driver, 10).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
        page = driver.execute_script(_READ_PAGE)
    except WebDriverException as exc:
        return f"does not load ({(exc.msg or type(exc).__name__).splitlines()[0]})"
    if page["url"].startswith("chrome-error:"):
        return "does not load (the browser's error page)"
    if page["status"] != 200:
        return f"does not load (HTTP {page['status']})"
    if not page["title"].strip():
        return "loads with an empty title"
    return page


def _console_errors(driver, base: str, report: Report) -> list[str]:
    """The page's SEVERE console entries since the last call, less the external loads."""
    errors = []
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        message = entry["message"]
        if entry.get("source") == "network" and not message.startswith(base):
            report.external_loads += 1  # blocked on purpose: the check runs offline
            continue
        errors.append(message)
    return errors


def _screenshot_problem(path: Path) -> str | None:
    # Pillow comes with matplotlib, which the docs extra installs (through cli).
    from PIL import Image

    size = path.stat().st_size
    if size < MIN_SCREENSHOT_BYTES:
        return f"screenshot {path} is only {size} bytes: a blank page?"
    with Image.open(path) as image:
        if image.format != "PNG":
            return f"screenshot {path} is not a PNG ({image.format})"
        # getcolors gives None once there are more colours than asked for: a real picture.
        colours = image.convert("RGB").getcolors(maxcolors=MIN_SCREENSHOT_COLOURS)
    if colours is not None:
        return f"screenshot {path} has only {len(colours)} colours: a blank page?"
    return None


def check_site(
    site: Path,
    screenshots: Path,
    screenshot_pages: tuple[str, ...] = SCREENSHOT_PAGES,
    chromium: str | None = None,
    chromedriver: str | None = None,
) -> Report:
    """Loads every page of the built ``site`` in headless Chromium; see the module's doc."""
    start = time.monotonic()
    chromium = chromium or _find_chromium()
    chromedriver = chromedriver or shutil.which("chromedriver")
    report = Report()
    with _serve(site) as base, _browser(chromium, chromedriver) as driver:
        # Every page of the site, linked or not, then whatever the links name besides.
        queue = [base + path.relative_to(site).as_posix() for path in sorted(site.rglob("*.html"))]
        pages: dict[str, _Page] = {}
        resources: dict[str, int | str] = {}
        links: list[tuple[str, str]] = []  # (page, link) for every internal link
        while queue:
            url = queue.pop(0)
            if url in pages:
                continue
            loaded = _load(driver, url)
            if isinstance(loaded, str):
                _console_errors(driver, base, report)  # its own 404, not the next page's
                pages[url] = _Page(error=loaded)
                continue  # reported where it is linked (or below, for a page of the site)
            pages[url] = _Page(anchors=set(loaded["anchors"]))
            probed = set()
            for link in loaded["links"]:
                if not link.startswith(base):
                    continue  # external, or javascript:, never fetched
                links.append((url, link))
                target = urldefrag(link).url
                if Path(urlsplit(target).path).suffix in PAGE_SUFFIXES:
                    queue.append(target)
                elif target not in resources:
                    resources[target] = driver.execute_async_script(_HEAD, target)
                    probed.add(target)
            # Read after the probes, whose failures log here too (and are reported as links).
            for error in _console_errors(driver, base, report):
                if not any(error.startswith(f"{target} ") for target in probed):
                    report.problems.append(f"{url[len(base) :]}: console error: {error}")

        for url, page in pages.items():
            if page.error and url.endswith(".html") and (site / url[len(base) :]).is_file():
                report.problems.append(f"{url[len(base) :]}: {page.error}")
        for url, link in links:
            target, fragment = urldefrag(link)
            where = f"{url[len(base) :]}: {link[len(base) :]}"
            report.fragments += bool(fragment)
            if target in resources:
                if resources[target] != 200:
                    report.problems.append(f"{where} (answers {resources[target]})")
            elif pages[target].error:
                report.problems.append(f"{where} ({pages[target].error})")
            elif fragment and unquote(fragment) not in pages[target].anchors:
                report.problems.append(f"{where} (no element with id {unquote(fragment)!r})")
        report.pages = len(pages)
        report.links = len(links)

        screenshots.mkdir(parents=True, exist_ok=True)
        for name in screenshot_pages:
            loaded = _load(driver, base + name)
            if isinstance(loaded, str):
                report.problems.append(f"{name}: {loaded}, no screenshot")
                continue
            path = screenshots / (name.replace("/", "_").removesuffix(".html") + ".png")
            driver.save_screenshot(str(path))
            problem = _screenshot_problem(path)
            if problem:
                report.problems.append(problem)
            report.screenshots.append(path)
    report.seconds = time.monotonic() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", nargs="?", type=Path, default=HERE / "_build" / "html")
    parser.add_argument("--screenshots", type=Path, default=HERE / "_build" / "screenshots")
    parser.add_argument("--chromium", help="the browser (default: chromium on the PATH)")
    parser.add_argument("--chromedriver", help="its driver (default: chromedriver on the PATH)")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"{args.site}: no built site (run `make docs`)", file=sys.stderr)
        return 2
    missing = missing_tools(args.chromium, args.chromedriver)
    if missing:
        print(
            f"no {', '.join(missing)}: install Chromium and its driver (Debian: apt-get install "
            "chromium chromium-driver) and Selenium (pip install selenium, or the docs extra)",
            file=sys.stderr,
        )
        return 2
    report = check_site(
        args.site.resolve(),
        args.screenshots,
        chromium=args.chromium,
        chromedriver=args.chromedriver,
    )
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(report.summary())
    if report.screenshots:
        print("screenshots: " + ", ".join(str(path) for path in report.screenshots))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
