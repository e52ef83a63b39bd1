"""The ``pyro-lunet`` entry point: the argument parser and :func:`main`.

Every failure a user can cause (a missing or malformed file, an unknown
flow, a width that does not match the checkpoint, an existing output
folder) ends in one line on stderr and exit status 2, never a traceback.
The commands themselves are in :mod:`pyro_lunet.cli.commands`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from .. import __version__
from . import commands
from .bench import add_arguments as add_bench_arguments
from .checkpoint import CheckpointError, flow_names, parse_flow
from .data_files import BUILT_IN, DataError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, expected: str, name: str):
    """An argparse type: an int of at least ``minimum`` (``name`` is what argparse reports)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = name
    return parse


_positive_int = _int_at_least(1, "a positive integer", "positive int")
_levels = _int_at_least(2, "a number of levels of at least 2", "levels")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:  # what torch.manual_seed takes
        raise argparse.ArgumentTypeError(f"expected a seed from -2**63 to 2**64 - 1, got {text}")
    return value


def _flow(text: str) -> str:
    try:
        parse_flow(text)
    except CheckpointError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _add_training_options(p: argparse.ArgumentParser, epochs_help: str, blocks_help: str,
                          lr_help: str) -> None:  # fmt: skip
    p.add_argument("--blocks", type=_positive_int, help=blocks_help)
    p.add_argument("--epochs", type=_positive_int, help=epochs_help)
    p.add_argument("--batch-size", type=_positive_int, default=256, help="rows per step (256)")
    p.add_argument("--lr", type=_positive_float, help=lr_help)
    p.add_argument("--rows", type=_positive_int, default=20000,
                   help="rows to draw from a built-in toy data set (20000)")  # fmt: skip
    p.add_argument("--seed", type=_seed, default=0, help="seeds data, split, init, samples (0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder that fit wrote (no other)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drop-nonfinite", action="store_true",
                   help="drop rows holding NaN or infinite values (else refused)")  # fmt: skip
    p.add_argument("--key", help="the array to read from an .npz holding several")


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-lunet`` parser; each command's parsed namespace carries its ``run``."""
    parser = _Parser(
        prog="pyro-lunet",
        description="Structured invertible linear flows for Pyro: fit, score and sample "
        "density models, time the layers.",
    )
    parser.add_argument("--version", action="version", version=f"pyro-lunet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, run, **kwargs):
        p = sub.add_parser(name, help=run.__doc__.split("\n")[0],
                           description=run.__doc__, **kwargs)  # fmt: skip
        p.set_defaults(run=run)
        return p

    p = command("fit", commands.fit, epilog=f"flows: {', '.join(flow_names())}")
    p.add_argument("data", metavar="DATA", help="a .csv/.npy/.npz file of numeric rows, or a "
                   f"built-in data set: {', '.join(BUILT_IN)}")  # fmt: skip
    p.add_argument(
        "--flow",
        default="lu-net",
        type=_flow,
        help="lu-net (default) or BUILDER:FAMILY, e.g. coupling:butterfly (list below)",
    )
    _add_training_options(
        p, "passes over the data (default: about 2000 optimizer steps)",
        "flow blocks (default: 8 for lu-net and activation flows, 4 for coupling and spline)",
        "Adam learning rate (default: 0.01 for lu-net and activation flows, 0.003 for "
        "coupling and spline flows)",
    )  # fmt: skip
    p.add_argument("--val-fraction", type=_fraction, default=0.1, help="held-out share (0.1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--out", help="output folder (default: runs/DATA, or runs/DATA-2, ...)")
    p.add_argument("--image-shape", metavar="HxW", help="rows are H x W images (.npy of "
                   "(N, H, W) arrays and the digits are known to be)")  # fmt: skip
    p.add_argument("--levels", type=_levels, metavar="L",
                   help="image flows: the rows are integer grey levels 0..L-1 (e.g. 256 for "
                   "8-bit images), fitted dequantized, with bits/dim in their discrete "
                   "space (default: the built-in data set's, 17 for digits; for files, "
                   "continuous)")  # fmt: skip
    p.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="train data-parallel in N processes on this machine (launched through "
                   "torchrun; under torchrun itself, leave it out)")  # fmt: skip
    _add_input_options(p)

    p = command("score", commands.score)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a folder written by fit")
    p.add_argument("data", metavar="DATA", help="rows to score (.csv/.npy/.npz or built-in)")
    p.add_argument("-o", "--output", help="write row,log_prob (row: 1-based position in DATA) "
                   "to this .csv, or the log_prob vector to .npy, instead of stdout")  # fmt: skip
    p.add_argument("--seed", type=_seed, default=0,
                   help="seeds the dequantization noise of discrete-image "
                   "checkpoints (0)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output file (never DATA or the checkpoint)")  # fmt: skip
    _add_input_options(p)

    p = command("sample", commands.sample)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a folder written by fit")
    p.add_argument("-n", "--num-samples", type=int, required=True, help="rows to draw")
    p.add_argument("-o", "--output", help="write to this .csv or .npy instead of stdout")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output file (never DATA or the checkpoint)")  # fmt: skip

    add_bench_arguments(command("bench", commands.bench))

    demo = commands.DEMO
    p = command("demo", commands.demo)
    _add_training_options(
        p, f"passes over the data (default: {demo.epochs})",
        f"flow blocks (default: {demo.blocks})",
        f"Adam learning rate (default: {demo.lr:g})",
    )  # fmt: skip
    p.set_defaults(rows=demo.rows, batch_size=demo.batch_size)
    p.add_argument("--out", help="output folder (default: pyro-lunet-demo, -2, ...)")
    return parser


def _out_of_memory(error: Exception) -> bool:
    # torch's CPU allocator fails with a plain RuntimeError, CUDA's with OutOfMemoryError.
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        "can't allocate memory" in str(error)
    )


def main(argv: list[str] | None = None) -> int:
    """Runs one ``pyro-lunet`` command; returns its exit status (0, 1, 2 or 130)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc relaunches
    prog = f"pyro-lunet {args.command}"
    try:
        return args.run(args)
    except (commands.CommandError, DataError, CheckpointError, FloatingPointError) as error:
        message = str(error)
    except BrokenPipeError:  # stdout closed early, e.g. `pyro-lunet sample ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        message = f"{error.filename or ''}: {error.strerror or error}".lstrip(": ")
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            return _internal_error(prog, error)
        message = "out of memory; ask for fewer rows (--rows, -n) or a smaller --batch-size"
    except KeyboardInterrupt:
        message = "interrupted; no output was written"
        print(f"\n{prog}: {message}", file=sys.stderr)
        return 130
    except Exception as error:
        return _internal_error(prog, error)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _internal_error(prog: str, error: Exception) -> int:
    """A defect of ours, not the user's: still one line, with the way to see more."""
    if os.environ.get("PYRO_LUNET_TRACEBACK"):
        raise error
    first_line = (str(error).splitlines() or [""])[0]
    print(
        f"{prog}: internal error: {type(error).__name__}: {first_line} "
        "(set PYRO_LUNET_TRACEBACK=1 to see the traceback, and please report it)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
