"""The ``pyro-lunet`` command line: ``fit``, ``score``, ``sample``, ``bench`` and ``demo``.

Every failure a user can cause (a missing or malformed file, an unknown
flow, a width that does not match the checkpoint, an existing output
folder) ends in one line on stderr and exit status 2, never a traceback;
outputs are written whole or not at all, and ``--overwrite`` replaces only
an output the command wrote, never an input or a folder of the user's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.distributions.torch_transform import ComposeTransformModule

from . import __version__
from ._scoring import held_out_count, log_prob_in_chunks, mean_nll
from .benchmark import add_arguments as add_bench_arguments
from .benchmark import run_from_args as run_bench
from .checkpoint import (
    CheckpointError,
    ModelConfig,
    build_model,
    flow_names,
    free_name,
    load_model,
    parse_flow,
    refuse_existing,
    resolve,
    save_model,
    write_file,
    write_folder,
)
from .data_files import (
    BUILT_IN,
    DataError,
    Rows,
    check_range,
    check_width,
    load_rows,
    standardization,
)
from .datasets import gaussian_mixture_log_prob
from .training import fit_density

#: ``--blocks`` when not given: activation flows need more blocks than coupling flows.
DEFAULT_BLOCKS = {"lu-net": 8, "activation": 8, "coupling": 4, "spline": 4}
#: ``--lr`` when not given: coupling networks want a smaller step than LU-Net.
DEFAULT_LR = {"lu-net": 1e-2, "activation": 1e-2, "coupling": 3e-3, "spline": 3e-3}
#: ``--epochs`` when not given: enough for about this many optimizer steps ...
DEFAULT_STEPS = 2000
#: ... within these bounds.
EPOCH_RANGE = (5, 200)
#: The fewest training rows ``fit`` accepts: the Gaussian baseline's covariance needs two.
MIN_TRAIN_ROWS = 2
#: ``sample`` draws (and writes) this many values at a time, so any -n fits in memory ...
SAMPLE_CHUNK = 2**20
#: ... and refuses an output file that would not fit on its disk, at about this many
#: bytes per value (%.17g and a comma; NPY: 8).
CSV_BYTES_PER_VALUE = 20
#: The demo's LU-Net: 16 blocks for 50 epochs (2.8 nats on the ring, against
#: 3.56 for the best Gaussian and 2.12 for the truth, in about 20 s).
DEMO_BLOCKS, DEMO_EPOCHS = 16, 50
LN2 = math.log(2.0)


class CommandError(Exception):
    """A failure to report as one line (the command line's own checks)."""


# ----------------------------------------------------------------- helpers
def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CommandError(f"unknown device {name!r}; expected e.g. cpu, cuda or cuda:1") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise CommandError(f"unsupported device {name!r}; expected cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CommandError(f"device {name!r} asked for, but this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s)")  # fmt: skip
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"device {name!r} asked for, but MPS is not available here")
    return device


def _versions() -> dict[str, str]:
    return {
        "pyro_lunet": __version__,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _nll_entry(nll: float, dim: int) -> dict[str, float]:
    return {"nats": nll, "bits_per_dim": nll / (dim * LN2)}


def _image_shape(text: str | None, rows: Rows) -> list[int] | None:
    if text is None:
        return list(rows.image_shape) if rows.image_shape else None
    try:
        shape = [int(part) for part in text.lower().split("x")]
    except ValueError:
        shape = []
    if len(shape) != 2 or min(shape) < 1:
        raise CommandError(f"--image-shape must be HxW, e.g. 8x8, got {text!r}")
    if math.prod(shape) != rows.dim:
        raise CommandError(
            f"--image-shape {text} holds {math.prod(shape)} values, rows hold {rows.dim}"
        )
    return shape


def _gaussian_nll(train: torch.Tensor, rows: torch.Tensor) -> float:
    """The held-out NLL of the best single Gaussian (fitted to ``train`` by moments)."""
    train, rows = train.double(), rows.double()
    cov = torch.atleast_2d(torch.cov(train.T))
    cov = cov + 1e-9 * cov.diagonal().mean() * torch.eye(
        len(cov), dtype=cov.dtype, device=cov.device
    )
    gaussian = torch.distributions.MultivariateNormal(train.mean(0), cov)
    return -gaussian.log_prob(rows).mean().item()


# --------------------------------------------------------------------- fit
def fit(args: argparse.Namespace) -> int:
    """Fits a flow density model to DATA and writes a checkpoint, metrics and figures."""
    builder, _ = parse_flow(args.flow)
    device = _device(args.device)
    out = Path(args.out) if args.out else free_name(Path("runs") / Path(args.data).stem)
    inputs = _inputs(args.data)
    # Before any work, not only once the fit is done.
    refuse_existing(out, args.overwrite, inputs, folder=True)
    rows = load_rows(args.data, num_rows=args.rows, seed=args.seed,
                     drop_nonfinite=args.drop_nonfinite, key=args.key)  # fmt: skip
    if rows.dropped:
        print(f"dropped {rows.dropped} rows holding NaN or infinite values")
    if len(rows.values) < 10:
        raise CommandError(f"{args.data}: {len(rows.values)} rows; need at least 10 to fit")
    num_val = held_out_count(len(rows.values), args.val_fraction)
    if len(rows.values) - num_val < MIN_TRAIN_ROWS:
        raise CommandError(
            f"--val-fraction {args.val_fraction:g} holds out {num_val} of the "
            f"{len(rows.values)} rows, leaving {len(rows.values) - num_val} to train on (need "
            f"at least {MIN_TRAIN_ROWS}); pass a smaller --val-fraction"
        )
    image_shape = _image_shape(args.image_shape, rows)
    mean, scale = standardization(rows, args.dtype)
    blocks = DEFAULT_BLOCKS[builder] if args.blocks is None else args.blocks
    lr = DEFAULT_LR[builder] if args.lr is None else args.lr
    config = ModelConfig(
        flow=args.flow, blocks=blocks, input_dim=rows.dim, mean=mean.tolist(),
        scale=scale.tolist(), dtype=args.dtype, image_shape=image_shape,
        data={"source": args.data, "rows": len(rows.values), "dropped": rows.dropped},
        versions=_versions(),
    )  # fmt: skip
    torch.manual_seed(args.seed)
    try:
        model, flow = build_model(config, device)
    except ValueError as error:  # e.g. a coupling flow on one column
        raise CommandError(f"cannot build {args.flow} for {rows.dim} columns: {error}") from None
    data = torch.as_tensor(rows.values, dtype=getattr(torch, args.dtype), device=device)
    steps_per_epoch = math.ceil((len(data) - num_val) / args.batch_size)
    epochs = args.epochs or min(max(math.ceil(DEFAULT_STEPS / steps_per_epoch), EPOCH_RANGE[0]),
                                EPOCH_RANGE[1])  # fmt: skip
    num_params = sum(p.numel() for p in flow.parameters())
    print(f"fitting {args.flow} ({blocks} blocks, {num_params:,} parameters) to "
          f"{len(data) - num_val} rows of {args.data} (D={rows.dim}), {num_val} held out, "
          f"{epochs} epochs on {device}")  # fmt: skip
    with write_folder(out, args.overwrite, inputs) as scratch:
        try:
            result = fit_density(
                ComposeTransformModule(model.transforms), data, epochs=epochs,
                batch_size=args.batch_size, lr=lr, val_fraction=args.val_fraction,
                seed=args.seed, progress=not args.quiet,
            )  # fmt: skip
        except ValueError as error:  # fit_density's data checks (e.g. constant training rows)
            raise CommandError(str(error)) from None
        train_rows, val_rows = (data[index] for index in result.split)
        metrics = {
            "data": {**config.data, "dim": rows.dim, "train_rows": len(train_rows),
                     "val_rows": len(val_rows)},
            "flow": args.flow, "blocks": blocks, "parameters": num_params,
            "train_nll": _nll_entry(mean_nll(model, train_rows), rows.dim),
            "val_nll": _nll_entry(result.best_val_nll, rows.dim),
            "gaussian_val_nll": _nll_entry(_gaussian_nll(train_rows, val_rows), rows.dim),
            "best_epoch": result.best_epoch + 1, "epochs": epochs,
            "batch_size": args.batch_size, "lr": lr, "seed": args.seed,
            "device": str(device), "dtype": args.dtype,
            "wall_seconds": result.seconds, "history": result.history,
            "versions": config.versions,
        }  # fmt: skip
        if args.data == "gaussian-mixture":
            true_nll = -gaussian_mixture_log_prob(val_rows.double()).mean().item()
            metrics["true_val_nll"] = _nll_entry(true_nll, rows.dim)
        save_model(scratch, flow, config)
        (scratch / "metrics.json").write_text(json.dumps(metrics, indent=2))
        figures = _figures(scratch, model, result.history, train_rows, image_shape, args.seed)
    _report(out, metrics, figures)
    return 0


def _figures(folder: Path, model, history, rows: torch.Tensor, image_shape, seed: int):
    from . import plots  # matplotlib loads only when figures are drawn

    plots.loss_curves(history, folder / "loss.png")
    names = ["loss.png"]
    torch.manual_seed(seed)
    with torch.no_grad():
        samples = model.sample((min(len(rows), 2000),)).cpu().double().numpy()
    data = rows.cpu().double().numpy()
    if data.shape[1] == 2:
        plots.density_map(model, data, samples, folder / "density.png")
        names.append("density.png")
    if image_shape:
        plots.sample_grid(samples, tuple(image_shape), folder / "samples.png",
                          (float(data.min()), float(data.max())))  # fmt: skip
        names.append("samples.png")
    return names


def _report(out: Path, metrics: dict, figures: list[str]) -> None:
    def line(label, entry):
        return f"  {label:<22s}{entry['nats']:10.4f} nats  {entry['bits_per_dim']:8.4f} bits/dim"

    print(line("training NLL", metrics["train_nll"]))
    print(line("validation NLL", metrics["val_nll"]))
    print(line("  best single Gaussian", metrics["gaussian_val_nll"]))
    if "true_val_nll" in metrics:
        print(line("  true density", metrics["true_val_nll"]))
    print(f"  best epoch {metrics['best_epoch']} of {metrics['epochs']}, "
          f"{metrics['wall_seconds']:.1f} s")  # fmt: skip
    files = ", ".join(["config.json", "model.pt", "metrics.json", *figures])
    print(f"wrote {out}/: {files}")


# ------------------------------------------------------------ score/sample
def _inputs(data: str | None, checkpoint: Path | None = None) -> list[Path]:
    """The files a command reads, which no output may replace (a built-in name is no file)."""
    files = [] if data is None or data in BUILT_IN else [Path(data)]
    return files + (sorted(checkpoint.iterdir()) if checkpoint else [])


def _load(args) -> tuple:
    device = _device(args.device)
    model, config = load_model(args.checkpoint, device)
    return model, config, device


def _check_output(path: str | None, overwrite: bool, inputs: list[Path]) -> str | None:
    """Refuses an output file (its type, an existing one, an input) before any work;
    returns its suffix, ``None`` for stdout."""
    if path is None:
        return None
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".npy"):
        raise CommandError(f"{path}: unknown output type {suffix!r}; expected .csv or .npy")
    if not Path(path).parent.is_dir():
        raise CommandError(f"{path}: no folder {Path(path).parent} to write into")
    refuse_existing(path, overwrite, inputs)
    return suffix


def _write_table(path: str | None, header: list[str], shape: tuple[int, ...], chunks,
                 overwrite: bool, inputs: list[Path]) -> None:  # fmt: skip
    """Rows, arriving as ``chunks`` of the whole ``shape``, to a CSV or NPY file (atomically),
    or as CSV to stdout without a path; never more than a chunk in memory."""
    if path is None:
        sys.stdout.write(",".join(header) + "\n")
        for chunk in chunks:
            np.savetxt(sys.stdout, chunk, delimiter=",", fmt="%.17g")
        return
    npy = Path(path).suffix.lower() == ".npy"

    def write(scratch: Path) -> None:
        with scratch.open("wb") as file:
            if npy:  # the header np.save writes, then the values as they come
                header_data = {"descr": "<f8", "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(file, header_data)
            else:
                file.write((",".join(header) + "\n").encode())
            for chunk in chunks:
                if npy:
                    file.write(np.ascontiguousarray(chunk, dtype="<f8").tobytes())
                else:
                    np.savetxt(file, chunk, delimiter=",", fmt="%.17g")

    write_file(path, write, overwrite, inputs)


def score(args: argparse.Namespace) -> int:
    """Writes the log-density (nats, the data's units) of every row of DATA under a checkpoint."""
    model, config, device = _load(args)
    inputs = _inputs(args.data, resolve(args.checkpoint))
    suffix = _check_output(args.output, args.overwrite, inputs)
    rows = load_rows(args.data, drop_nonfinite=args.drop_nonfinite, key=args.key)
    check_width(rows, config.input_dim, f"the checkpoint {args.checkpoint}")
    check_range(rows, config.dtype)
    data = torch.as_tensor(rows.values, dtype=getattr(torch, config.dtype), device=device)
    try:
        log_p = log_prob_in_chunks(model, data).cpu().double().numpy()
    except ValueError:  # the base density's check of what the flow made of a far-out row
        raise CommandError(
            f"{args.data}: some rows lie so far from the fitted data that their log-density "
            f"overflows {config.dtype}; fit with --dtype float64 or rescale the data"
        ) from None
    table = np.column_stack([rows.row_numbers + 1, log_p])
    if suffix == ".npy":
        table = log_p  # NumPy users get the plain vector
    _write_table(args.output, ["row", "log_prob"], table.shape, [table], args.overwrite, inputs)
    dropped = f", {rows.dropped} dropped (NaN or infinite)" if rows.dropped else ""
    print(f"scored {len(log_p)} rows{dropped}: mean log-density {log_p.mean():.4f} nats "
          f"({log_p.mean() / (rows.dim * LN2):.4f} bits/dim)", file=sys.stderr)  # fmt: skip
    return 0


def sample(args: argparse.Namespace) -> int:
    """Draws N rows from a checkpoint's model, in the data's units."""
    if args.num_samples < 1:
        raise CommandError(f"-n must be a positive number of rows, got {args.num_samples}")
    model, config, _ = _load(args)
    n, dim = args.num_samples, config.input_dim
    inputs = _inputs(None, resolve(args.checkpoint))
    suffix = _check_output(args.output, args.overwrite, inputs)
    if suffix is not None:  # stdout streams as long as its reader reads
        need = n * dim * (8 if suffix == ".npy" else CSV_BYTES_PER_VALUE)
        free = shutil.disk_usage(Path(args.output).parent).free
        if need > free:
            raise CommandError(
                f"-n {n}: {n} rows of {dim} values need about {need / 1e9:,.1f} GB in "
                f"{args.output}, but {free / 1e9:,.1f} GB are free there"
            )

    def draws():
        rows = max(1, SAMPLE_CHUNK // dim)
        torch.manual_seed(args.seed)
        with torch.no_grad():
            for start in range(0, n, rows):
                yield model.sample((min(rows, n - start),)).cpu().double().numpy()

    header = [f"x{i + 1}" for i in range(dim)]
    _write_table(args.output, header, (n, dim), draws(), args.overwrite, inputs)
    if args.output:
        print(f"wrote {n} samples to {args.output}", file=sys.stderr)
    return 0


# ------------------------------------------------------------ bench, demo
def bench(args: argparse.Namespace) -> int:
    """Times every layer family against nflows, zuko, normflows and Pyro's built-ins."""
    run_bench(args)
    return 0


def demo(args: argparse.Namespace) -> int:
    """Fits LU-Net to the built-in 2-D Gaussian mixture and writes everything to a folder."""
    args.data, args.flow = "gaussian-mixture", "lu-net"
    # Deeper and longer than fit's defaults, still well under a minute on 2 cores.
    args.blocks, args.epochs = args.blocks or DEMO_BLOCKS, args.epochs or DEMO_EPOCHS
    args.out = args.out or str(free_name("pyro-lunet-demo"))
    args.val_fraction, args.device, args.dtype = 0.1, "cpu", "float32"
    args.key = args.image_shape = None
    args.drop_nonfinite = False
    status = fit(args)
    print("In 2-D LU-Net's monotone activations leave some mass between the modes; a spline\n"
          "coupling flow comes within 0.1 nats of the true density:\n"
          "  pyro-lunet fit gaussian-mixture --flow spline:lu")  # fmt: skip
    return status


# ------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


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


def _add_training_options(p: argparse.ArgumentParser, epochs_help: str, blocks_help: str) -> None:
    p.add_argument("--blocks", type=_positive_int, help=blocks_help)
    p.add_argument("--epochs", type=_positive_int, help=epochs_help)
    p.add_argument("--batch-size", type=_positive_int, default=256, help="rows per step (256)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: 0.01 for "
                   "lu-net and activation flows, 0.003 for coupling and spline flows)")  # fmt: skip
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

    p = command("fit", fit, epilog=f"flows: {', '.join(flow_names())}")
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
    )  # fmt: skip
    p.add_argument("--val-fraction", type=_fraction, default=0.1, help="held-out share (0.1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--out", help="output folder (default: runs/DATA, or runs/DATA-2, ...)")
    p.add_argument("--image-shape", metavar="HxW", help="rows are H x W images (.npy of "
                   "(N, H, W) arrays and the digits are known to be)")  # fmt: skip
    _add_input_options(p)

    p = command("score", score)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a folder written by fit")
    p.add_argument("data", metavar="DATA", help="rows to score (.csv/.npy/.npz or built-in)")
    p.add_argument("-o", "--output", help="write row,log_prob (row: 1-based position in DATA) "
                   "to this .csv, or the log_prob vector to .npy, instead of stdout")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output file (never DATA or the checkpoint)")  # fmt: skip
    _add_input_options(p)

    p = command("sample", sample)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a folder written by fit")
    p.add_argument("-n", "--num-samples", type=int, required=True, help="rows to draw")
    p.add_argument("-o", "--output", help="write to this .csv or .npy instead of stdout")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output file (never DATA or the checkpoint)")  # fmt: skip

    add_bench_arguments(command("bench", bench))

    p = command("demo", demo)
    _add_training_options(p, f"passes over the data (default: {DEMO_EPOCHS})",
                          f"LU-Net blocks (default: {DEMO_BLOCKS})")  # fmt: skip
    p.add_argument("--out", help="output folder (default: pyro-lunet-demo, -2, ...)")
    return parser


def _flow(text: str) -> str:
    try:
        parse_flow(text)
    except CheckpointError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _out_of_memory(error: Exception) -> bool:
    # torch's CPU allocator fails with a plain RuntimeError, CUDA's with OutOfMemoryError.
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        "can't allocate memory" in str(error)
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"pyro-lunet {args.command}"
    try:
        return args.run(args)
    except (CommandError, DataError, CheckpointError, FloatingPointError) as error:
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
