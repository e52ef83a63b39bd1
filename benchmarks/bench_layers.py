"""Speed of every layer against nflows, zuko, normflows and Pyro's built-ins, in one run,
checked against the project's targets (``targets.py``).

The harness lives in the package (:mod:`pyro_lunet.cli.bench`) so that
``pyro-lunet bench`` runs it too; the targets live here, beside the other
benchmarks. ``python benchmarks/bench_layers.py --dims 64 256 1024 4096 --json out.json``
prints the tables, then each target's outcome, and writes both to the JSON.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from targets import report  # noqa: E402

from pyro_lunet.cli.bench import __doc__ as harness_doc  # noqa: E402
from pyro_lunet.cli.bench import add_arguments, run_from_args  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=harness_doc.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), checks=report)


if __name__ == "__main__":
    main()
