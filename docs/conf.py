"""Sphinx configuration of the pyro-lunet API site (``make docs``)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import pyro_lunet  # noqa: E402

project = "pyro-lunet"
author = "the pyro-lunet developers"
copyright = "2026, the pyro-lunet developers"
release = version = pyro_lunet.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    # MathJax served from the site itself: the math renders offline (no CDN).
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
# Pyro's own site: the Read the Docs theme, members in source order, signatures
# without the module path.
html_theme = "sphinx_rtd_theme"
html_title = f"pyro-lunet {release}"
html_static_path: list[str] = []
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
add_module_names = False
# Nothing is fetched at build time (no intersphinx): the site builds offline.

# The tutorials, executed on every build in their quick mode (the test suite's),
# so the site shows their outputs; they are stored without outputs.
nb_execution_mode = "force"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
os.environ.setdefault("PYRO_LUNET_TUTORIAL_QUICK", "1")
_tutorials = HERE / "tutorials"
_tutorials.mkdir(exist_ok=True)
for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
    shutil.copy2(notebook, _tutorials / notebook.name)


def _documented() -> set[str]:
    """Names the hand-written API pages document (``.. autoX:: name``)."""
    names = set()
    for page in (HERE / "api").glob("*.rst"):
        if page.name == "more.rst":
            # Generated below from what this returns: reading the last build's copy would
            # count its names as documented, and every other build would drop them from it.
            continue
        names.update(re.findall(r"^\.\. auto\w+:: (?:pyro_lunet\.)?(\w+)\s*$",
                                page.read_text(), flags=re.M))  # fmt: skip
    return names


# Every public name gets a page: names of ``pyro_lunet.__all__`` that no hand-written
# page documents yet (e.g. a new module's) are listed on api/more, generated here.
_more = sorted(set(pyro_lunet.__all__) - _documented())
_lines = [
    "More",
    "====",
    "",
    "Public names of :mod:`pyro_lunet` without a page of their own yet.",
    "",
    ".. currentmodule:: pyro_lunet",
    "",
]
for _name in _more:
    _kind = "autoclass" if isinstance(getattr(pyro_lunet, _name), type) else "autofunction"
    _lines += [f".. {_kind}:: {_name}", ""]
if not _more:
    _lines += ["(None: every public name is documented on the pages above.)", ""]
(HERE / "api" / "more.rst").write_text("\n".join(_lines))
