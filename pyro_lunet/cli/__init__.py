"""The ``pyro-lunet`` command line (needs the ``cli`` extra: ``pip install "pyro-lunet[cli]"``).

* :mod:`~pyro_lunet.cli.main`: the entry point and the argument parser;
* :mod:`~pyro_lunet.cli.commands`: ``fit`` (in named steps), ``score``,
  ``sample``, ``bench`` and ``demo``;
* :mod:`~pyro_lunet.cli.checkpoint`: the run folder and checkpoint format;
* :mod:`~pyro_lunet.cli.data_files`: reading and checking CSV, NPY and NPZ rows;
* :mod:`~pyro_lunet.cli.plots`: the figures ``fit`` writes (matplotlib);
* :mod:`~pyro_lunet.cli.bench`: the layer benchmark's harness.

Nothing here is imported by ``import pyro_lunet``.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
