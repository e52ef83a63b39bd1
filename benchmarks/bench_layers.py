"""Speed of every layer against nflows, zuko, normflows and Pyro's built-ins, in one run.

The harness lives in the package (:mod:`pyro_lunet.benchmark`) so that
``pyro-lunet bench`` runs it too; this script is the same entry point, for
``python benchmarks/bench_layers.py --dims 64 256 1024 4096 --json out.json``.
"""

from pyro_lunet.benchmark import main

if __name__ == "__main__":
    main()
