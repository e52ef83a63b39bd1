"""The library imports without the command line's extras (matplotlib, scikit-learn), and the
command line lives in its own subpackage."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("matplotlib", "sklearn")


def _run(code: str) -> subprocess.CompletedProcess:
    blocker = f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_every_library_module_imports_without_matplotlib_and_sklearn():
    done = _run("""
        import importlib, pkgutil
        import pyro_lunet
        names = [m.name for m in pkgutil.walk_packages(pyro_lunet.__path__, "pyro_lunet.")
                 if not m.name.startswith("pyro_lunet.cli")
                 and not m.name.startswith("pyro_lunet.__main__")]
        for name in names:
            importlib.import_module(name)
        for name in pyro_lunet.__all__:
            getattr(pyro_lunet, name)
        print(len(names))
    """)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 5


def test_the_library_does_not_load_the_cli_or_its_extras():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, pyro_lunet; print(sorted(m for m in sys.modules "
         "if m.split('.')[0] in ('matplotlib', 'sklearn') or m.startswith('pyro_lunet.cli')))"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)


def test_without_the_extras_the_digits_and_fit_say_what_to_install():
    done = _run("""
        from pyro_lunet.datasets import digits
        try:
            digits()
        except ImportError as error:
            print(error)
    """)
    assert 'pip install "pyro-lunet[cli]"' in done.stdout, done.stderr
    done = _run("""
        from pyro_lunet.cli import main
        sys.exit(main(["fit", "moons", "--rows", "50", "--epochs", "1", "--quiet"]))
    """)
    assert done.returncode == 2 and "pyro-lunet[cli]" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "pyro_lunet", "--version"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("pyro-lunet ")
