"""The ``pyro-lunet`` commands: ``fit``, ``score``, ``sample``, ``bench`` and ``demo``.

Each command takes the parsed arguments and returns an exit status; a failure
the user can fix raises :class:`CommandError` (or a :class:`DataError` or
:class:`CheckpointError`), which :func:`pyro_lunet.cli.main` prints as one
line. Outputs are written whole or not at all, and ``--overwrite`` replaces
only an output the command wrote, never an input or a folder of the user's.

``fit`` is :func:`run_fit` on a typed :class:`FitOptions`, in named steps:
:func:`prepare_fit` (read and check everything, refuse what cannot work,
before any training), :func:`build_flow`, :func:`train`, :func:`evaluate`,
:func:`write_run` and :func:`report`. ``demo`` is :func:`run_demo`, the same
fit with the demo's own options.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.distributions.torch_transform import ComposeTransformModule

from .. import __version__, distributed
from .._scoring import held_out_count, log_prob_in_chunks, mean_nll
from ..datasets import gaussian_mixture_log_prob
from ..image_flows import bits_per_dim, dequantize
from ..training import FitResult, fit_density
from .bench import run_from_args as run_bench
from .checkpoint import (
    ModelConfig,
    build_model,
    discrete_config,
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
    BUILT_IN_LEVELS,
    Rows,
    check_levels,
    check_range,
    check_width,
    load_rows,
    standardization,
)

#: ``--blocks`` when not given: activation flows need more blocks than coupling flows.
DEFAULT_BLOCKS = {"lu-net": 8, "activation": 8, "coupling": 4, "spline": 4, "image": 2}
#: ``--lr`` when not given: coupling networks want a smaller step than LU-Net.
DEFAULT_LR = {"lu-net": 1e-2, "activation": 1e-2, "coupling": 3e-3, "spline": 3e-3,
              "image": 2e-3}  # fmt: skip
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
LN2 = math.log(2.0)
#: Discrete images: the held-out bits/dim average this many uniform-noise draws per row ...
NOISE_DRAWS = 4
#: ... from a generator seeded with the fit's seed plus this (apart from the training noise).
NOISE_SEED_OFFSET = 1


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


def dequantize_in_units(rows: torch.Tensor, generator: torch.Generator | None = None,
                        levels: int = 256) -> torch.Tensor:  # fmt: skip
    """``x + v``, ``v ~ U[0, 1)``: the dequantized rows a discrete-image model scores, in the
    data's units (``L`` times :func:`~pyro_lunet.image_flows.dequantize`'s ``u``)."""
    return levels * dequantize(rows, levels, generator=generator)


def discrete_bits_per_dim(model, rows: torch.Tensor, levels: int,
                          draws: int = NOISE_DRAWS, seed: int = 0) -> torch.Tensor:  # fmt: skip
    r"""Each row's bits/dim in the data's discrete space under a discrete-image model.

    For integer rows :math:`x \in \{0, \dots, L-1\}^D` and ``model`` a density of
    :math:`y = x + v` (the command line's, :mod:`~pyro_lunet.cli.checkpoint`): the mean,
    over ``draws`` uniform-noise draws :math:`u = (x + v) / L`
    (:func:`~pyro_lunet.image_flows.dequantize`, from a generator seeded with ``seed``), of
    :func:`~pyro_lunet.bits_per_dim`, :math:`(-\log p(u) + D \log L) / (D \log 2)`, with
    :math:`\log p(u) = \log p_y(L u) + D \log L` (the scaling's log-det). By Jensen each
    draw's expectation bounds :math:`-\log_2 P(x) / D` from above; a uniform model gives
    :math:`\log_2 L`.
    """
    dim = rows.shape[-1]
    gen = torch.Generator(device=rows.device).manual_seed(seed)
    total = torch.zeros(rows.shape[:-1], dtype=torch.float64, device=rows.device)
    for _ in range(draws):
        u = dequantize(rows, levels, generator=gen)
        log_p_u = log_prob_in_chunks(model, levels * u) + dim * math.log(levels)
        total = total + bits_per_dim(log_p_u.double(), dim, levels)
    return total / draws


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
@dataclass(frozen=True)
class FitOptions:
    """What ``pyro-lunet fit`` is asked to do: its command-line options, typed.

    ``None`` for ``blocks``, ``epochs``, ``lr`` or ``out`` takes the default
    for the flow (:data:`DEFAULT_BLOCKS`, :data:`DEFAULT_STEPS`,
    :data:`DEFAULT_LR`) or a free folder name under ``runs/``. ``levels`` (image
    flows only) says the rows are integer images in ``0..levels-1``; ``None`` takes
    the built-in data set's (:data:`~pyro_lunet.cli.data_files.BUILT_IN_LEVELS`,
    17 for the digits) and, for a file, fits the rows as continuous values.
    """

    data: str
    flow: str = "lu-net"
    blocks: int | None = None
    epochs: int | None = None
    batch_size: int = 256
    lr: float | None = None
    rows: int = 20000
    val_fraction: float = 0.1
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    quiet: bool = False
    image_shape: str | None = None
    drop_nonfinite: bool = False
    key: str | None = None
    levels: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FitOptions:
        """The options of a parsed ``fit`` (or ``demo``) namespace; missing ones keep defaults."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**given)


@dataclass
class FitPlan:
    """A fit, checked and ready to run (:func:`prepare_fit`): nothing trained or written yet."""

    options: FitOptions
    out: Path
    inputs: list[Path]
    device: torch.device
    rows: Rows
    num_val: int
    config: ModelConfig
    epochs: int
    lr: float

    @property
    def levels(self) -> int | None:
        """Grey levels of discrete images (the rows are integers ``0..L-1``), else ``None``."""
        return self.config.levels

    @property
    def num_train(self) -> int:
        return len(self.rows.values) - self.num_val


@dataclass
class FitOutcome:
    """What :func:`run_fit` wrote: the run folder, its metrics and figure names."""

    out: Path
    metrics: dict
    figures: list[str]


def prepare_fit(options: FitOptions) -> FitPlan:
    """Step 1: resolves defaults, reads and checks the data and the output folder.

    Everything a fit can be refused for is refused here, before any training.
    """
    builder, _ = parse_flow(options.flow)
    levels = options.levels
    if levels is not None and builder != "image":
        raise CommandError(f"--levels is for image flows (--flow image:FAMILY), "
                           f"got --flow {options.flow}")  # fmt: skip
    if builder == "image" and levels is None:
        levels = BUILT_IN_LEVELS.get(options.data)
    if importlib.util.find_spec("matplotlib") is None:
        raise CommandError('fit draws its figures with matplotlib, which is not installed: '
                           'pip install "pyro-lunet[cli]"')  # fmt: skip
    device = _device(options.device)
    out = Path(options.out) if options.out else free_name(Path("runs") / Path(options.data).stem)
    inputs = _inputs(options.data)
    refuse_existing(out, options.overwrite, inputs, folder=True)
    rows = load_rows(options.data, num_rows=options.rows, seed=options.seed,
                     drop_nonfinite=options.drop_nonfinite, key=options.key,
                     discrete=levels is not None)  # fmt: skip
    if levels is not None:
        check_levels(rows, levels)
    elif builder == "image" and np.array_equal(rows.values, np.round(rows.values)):
        print(f"note: {options.data} holds integers only; if they are grey levels 0..L-1, "
              "pass --levels L to fit them as discrete images (dequantized, bits/dim in "
              "the data's discrete space)")  # fmt: skip
    if rows.dropped:
        print(f"dropped {rows.dropped} rows holding NaN or infinite values")
    if len(rows.values) < 10:
        raise CommandError(f"{options.data}: {len(rows.values)} rows; need at least 10 to fit")
    num_val = held_out_count(len(rows.values), options.val_fraction)
    if len(rows.values) - num_val < MIN_TRAIN_ROWS:
        raise CommandError(
            f"--val-fraction {options.val_fraction:g} holds out {num_val} of the "
            f"{len(rows.values)} rows, leaving {len(rows.values) - num_val} to train on (need "
            f"at least {MIN_TRAIN_ROWS}); pass a smaller --val-fraction"
        )
    image_shape = _image_shape(options.image_shape, rows)
    if levels is not None:  # the model's own map to data units: y = L u (checkpoint.py)
        units = discrete_config(levels, rows.dim)
    else:
        mean, scale = standardization(rows, options.dtype)
        units = {"mean": mean.tolist(), "scale": scale.tolist()}
    blocks = DEFAULT_BLOCKS[builder] if options.blocks is None else options.blocks
    config = ModelConfig(
        flow=options.flow, blocks=blocks, input_dim=rows.dim, **units, dtype=options.dtype,
        image_shape=image_shape, levels=levels,
        data={"source": options.data, "rows": len(rows.values), "dropped": rows.dropped},
        versions=_versions(),
    )  # fmt: skip
    steps_per_epoch = math.ceil((len(rows.values) - num_val) / options.batch_size)
    epochs = options.epochs or min(max(math.ceil(DEFAULT_STEPS / steps_per_epoch),
                                       EPOCH_RANGE[0]), EPOCH_RANGE[1])  # fmt: skip
    lr = DEFAULT_LR[builder] if options.lr is None else options.lr
    return FitPlan(options, out, inputs, device, rows, num_val, config, epochs, lr)


def build_flow(plan: FitPlan):
    """Step 2: the model (data units) and its fresh flow, seeded with the fit's seed."""
    torch.manual_seed(plan.options.seed)
    try:
        return build_model(plan.config, plan.device)
    except ValueError as error:  # e.g. a coupling flow on one column
        raise CommandError(
            f"cannot build {plan.options.flow} for {plan.rows.dim} columns: {error}"
        ) from None


def train(plan: FitPlan, model, flow: torch.nn.Module) -> tuple[torch.Tensor, FitResult]:
    """Step 3: :func:`~pyro_lunet.fit_density` of the model (flow, then the fixed
    standardization) on the data in its own units; returns the data tensor and the
    result. On failure or interrupt the flow is left in its best known state."""
    options = plan.options
    data = torch.as_tensor(plan.rows.values, dtype=getattr(torch, options.dtype),
                           device=plan.device)  # fmt: skip
    num_params = sum(p.numel() for p in flow.parameters())
    discrete = "" if plan.levels is None else f", {plan.levels} levels dequantized"
    distributed.print_main(
        f"fitting {options.flow} ({plan.config.blocks} blocks, {num_params:,} parameters) to "
        f"{plan.num_train} rows of {options.data} (D={plan.rows.dim}{discrete}), "
        f"{plan.num_val} held out, {plan.epochs} epochs on {plan.device}"
    )
    noise = None if plan.levels is None else partial(dequantize_in_units, levels=plan.levels)
    try:
        result = fit_density(
            ComposeTransformModule(model.transforms), data, epochs=plan.epochs,
            batch_size=options.batch_size, lr=plan.lr,
            val_fraction=options.val_fraction, seed=options.seed, progress=not options.quiet,
            dequantize=noise,
        )  # fmt: skip
    except ValueError as error:  # fit_density's data checks (e.g. constant training rows)
        raise CommandError(str(error)) from None
    return data, result


def evaluate(plan: FitPlan, model, flow, data: torch.Tensor, result: FitResult) -> dict:
    """Step 4: the run's metrics (``metrics.json``): NLLs in nats and bits/dim next to the
    best single Gaussian's (and the true density's, for the built-in Gaussian mixture).
    For discrete images the rows scored are dequantized and ``bits_per_dim_discrete``
    holds bits/dim in the data's discrete space (:func:`_discrete_metrics`)."""
    options, dim = plan.options, plan.rows.dim
    train_rows, val_rows = (data[index] for index in result.split)
    if plan.levels is None:
        train_nll, gaussian_nll = mean_nll(model, train_rows), _gaussian_nll(train_rows, val_rows)
        discrete = {}
    else:  # scored on dequantized rows, as trained
        train_nll, gaussian_nll, discrete = _discrete_metrics(plan, model, train_rows, val_rows)
    metrics = {
        "data": {**plan.config.data, "dim": dim, "train_rows": len(train_rows),
                 "val_rows": len(val_rows)},
        "flow": options.flow, "blocks": plan.config.blocks,
        "parameters": sum(p.numel() for p in flow.parameters()),
        "train_nll": _nll_entry(train_nll, dim),
        "val_nll": _nll_entry(result.best_val_nll, dim),
        "gaussian_val_nll": _nll_entry(gaussian_nll, dim),
        "best_epoch": result.best_epoch + 1, "epochs": plan.epochs,
        "batch_size": options.batch_size, "lr": plan.lr, "seed": options.seed,
        "device": str(plan.device), "dtype": options.dtype,
        "wall_seconds": result.seconds, "history": result.history,
        "versions": plan.config.versions, **discrete,
    }  # fmt: skip
    if options.data == "gaussian-mixture":
        true_nll = -gaussian_mixture_log_prob(val_rows.double()).mean().item()
        metrics["true_val_nll"] = _nll_entry(true_nll, dim)
    return metrics


def _discrete_metrics(plan: FitPlan, model, train_rows: torch.Tensor,
                      val_rows: torch.Tensor) -> tuple[float, float, dict]:  # fmt: skip
    """Discrete images: the training NLL and the best single Gaussian's held-out NLL on one
    noise draw of the dequantized rows (in nats each already bounds ``-log P(x)``, as
    fit_density's ``val_nll`` on its fixed draw does), and ``{"bits_per_dim_discrete":
    ...}``, the held-out and training bits/dim in the data's discrete space averaged over
    :data:`NOISE_DRAWS` draws (:func:`discrete_bits_per_dim`)."""
    levels, dim, seed = plan.levels, plan.rows.dim, plan.options.seed + NOISE_SEED_OFFSET
    gen = torch.Generator(device=train_rows.device).manual_seed(seed)
    train_y = dequantize_in_units(train_rows, gen, levels)
    val_y = dequantize_in_units(val_rows, gen, levels)
    gaussian = _gaussian_nll(train_y, val_y)
    bits = {
        "levels": levels,
        "dim": dim,
        "val": discrete_bits_per_dim(model, val_rows, levels, seed=seed).mean().item(),
        "train": discrete_bits_per_dim(model, train_rows, levels, seed=seed).mean().item(),
        "gaussian_val": gaussian / (dim * LN2),
        "noise_draws": NOISE_DRAWS,
        "noise_seed": seed,
        "estimate": (
            f"mean over {NOISE_DRAWS} uniform-noise draws per row of (-log p(u) + D log L) "
            "/ (D log 2), u = (x + U[0,1)) / L: an upper bound on -log2 P(x) / D of the "
            "discrete model (Jensen); gaussian_val is one draw"
        ),
    }
    return mean_nll(model, train_y), gaussian, {"bits_per_dim_discrete": bits}


def write_run(plan: FitPlan, folder: Path, model, flow, data: torch.Tensor,
              result: FitResult, metrics: dict) -> list[str]:  # fmt: skip
    """Step 5: the checkpoint, the metrics and the figures, into ``folder`` (the scratch
    folder of :func:`~pyro_lunet.cli.checkpoint.write_folder`); returns the figure names."""
    save_model(folder, flow, plan.config)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    train_rows = data[result.split[0]]
    true_log_prob = gaussian_mixture_log_prob if plan.options.data == "gaussian-mixture" else None
    return _figures(folder, model, metrics, train_rows, plan.config.image_shape,
                    plan.options.seed, true_log_prob, plan.levels)  # fmt: skip


def run_fit(options: FitOptions) -> FitOutcome:
    """Fits a flow density model as ``options`` say and writes its run folder.

    Under ``torchrun`` (a process group in the environment) every process
    trains its share of each batch (:mod:`pyro_lunet.distributed`) and only
    rank 0 writes the folder and reports.
    """
    with distributed.process_group_from_env():
        plan = prepare_fit(options)
        model, flow = build_flow(plan)
        if not distributed.is_main_process():
            data, result = train(plan, model, flow)
            return FitOutcome(plan.out, evaluate(plan, model, flow, data, result), [])
        with write_folder(plan.out, options.overwrite, plan.inputs) as scratch:
            data, result = train(plan, model, flow)
            metrics = evaluate(plan, model, flow, data, result)
            figures = write_run(plan, scratch, model, flow, data, result, metrics)
        report(plan.out, metrics, figures)
        return FitOutcome(plan.out, metrics, figures)


def fit(args: argparse.Namespace) -> int:
    """Fits a flow density model to DATA and writes a checkpoint, metrics and figures."""
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
        return distributed.launch(_without_nproc(args.argv), nproc)
    run_fit(FitOptions.from_args(args))
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``): what each launched process runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _figures(folder: Path, model, metrics: dict, rows: torch.Tensor, image_shape, seed: int,
             true_log_prob=None, levels: int | None = None) -> list[str]:  # fmt: skip
    from . import plots  # matplotlib loads only when figures are drawn

    plots.loss_curves(metrics["history"], folder / "loss.png")
    names = ["loss.png"]
    torch.manual_seed(seed)
    with torch.no_grad():
        samples = model.sample((min(len(rows), 2000),))
    samples = to_levels(samples, levels).cpu().double().numpy()
    data = rows.cpu().double().numpy()
    if data.shape[1] == 2:
        truth = None if "true_val_nll" not in metrics else metrics["true_val_nll"]["nats"]
        plots.density_map(model, data, samples, folder / "density.png",
                          val_nll=metrics["val_nll"]["nats"], true_log_prob=true_log_prob,
                          true_nll=truth)  # fmt: skip
        names.append("density.png")
    if image_shape:
        plots.sample_grid(samples, tuple(image_shape), folder / "samples.png",
                          (float(data.min()), float(data.max())))  # fmt: skip
        names.append("samples.png")
    return names


def to_levels(samples: torch.Tensor, levels: int | None) -> torch.Tensor:
    """Samples of a discrete-image model (``y = x + v``) as images in the data's units, the
    integers ``0..L-1`` (``floor(y)``; the logit map leaves a little mass just outside
    ``[0, L)``, which goes to the nearest level); others as they are."""
    if levels is None:
        return samples
    return samples.floor().clamp(0, levels - 1)


def report(out: Path, metrics: dict, figures: list[str]) -> None:
    """Step 6: the NLLs and what was written, on stdout."""

    def line(label, entry):
        return f"  {label:<22s}{entry['nats']:10.4f} nats  {entry['bits_per_dim']:8.4f} bits/dim"

    print(line("training NLL", metrics["train_nll"]))
    print(line("validation NLL", metrics["val_nll"]))
    print(line("  best single Gaussian", metrics["gaussian_val_nll"]))
    if "true_val_nll" in metrics:
        print(line("  true density", metrics["true_val_nll"]))
    if "bits_per_dim_discrete" in metrics:
        d = metrics["bits_per_dim_discrete"]
        print(f"  bits/dim in the data's discrete space ({d['levels']} levels, mean of "
              f"{d['noise_draws']} noise draws; log2 {d['levels']} = "
              f"{math.log2(d['levels']):.4f} for a uniform model):")  # fmt: skip
        for label, key in (("training", "train"), ("validation", "val"),
                           ("  best single Gaussian", "gaussian_val")):  # fmt: skip
            print(f"  {label:<22s}{d[key]:10.4f} bits/dim")
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
    """Writes the log-density (nats, the data's units) of every row of DATA under a checkpoint.

    For a discrete-image checkpoint (fitted with levels) the rows must be integers in
    0..L-1; each is scored as x + v for one uniform-noise draw v (seeded by --seed).
    """
    model, config, device = _load(args)
    inputs = _inputs(args.data, resolve(args.checkpoint))
    suffix = _check_output(args.output, args.overwrite, inputs)
    rows = load_rows(args.data, drop_nonfinite=args.drop_nonfinite, key=args.key,
                     discrete=config.levels is not None)  # fmt: skip
    check_width(rows, config.input_dim, f"the checkpoint {args.checkpoint}")
    check_range(rows, config.dtype)
    if config.levels is not None:
        check_levels(rows, config.levels, f"the checkpoint (fitted with {config.levels} levels)")
    data = torch.as_tensor(rows.values, dtype=getattr(torch, config.dtype), device=device)
    if config.levels is not None:  # one noise draw per row: a lower bound on log P(x)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        data = dequantize_in_units(data, gen, config.levels)
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
    if config.levels is not None:
        print(f"(discrete images, {config.levels} levels: log p(x + v) for one uniform-noise "
              f"draw v per row (--seed {args.seed}), a lower bound on log P(x) in "
              "expectation)", file=sys.stderr)  # fmt: skip
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
                draw = model.sample((min(rows, n - start),))
                yield to_levels(draw, config.levels).cpu().double().numpy()

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


#: The demo's fit: a spline coupling flow with LU mixers on the built-in ring of eight
#: Gaussians. Measured on the project's 2-core machine (README): 0.08 nats above the true
#: density's held-out NLL (0.14 and 0.13 with seeds 1 and 2; the best Gaussian is 1.44
#: above) in about 20 CPU-seconds, the fit 15 of them; two more epochs gain nothing with
#: seed 0. LU-Net, whose monotone activations leave mass between the modes, ended 0.61
#: above the truth in 85 s (issue 19).
DEMO = FitOptions(data="gaussian-mixture", flow="spline:lu", blocks=4, epochs=10,
                  batch_size=512, lr=1e-2, rows=20000)  # fmt: skip
#: What the demo suggests next.
DEMO_NEXT = ("next: your own data, `pyro-lunet fit data.csv --flow spline:lu`; another mixer, "
             "`--flow spline:butterfly`; or a guide for Pyro's SVI (tutorials/02)")  # fmt: skip


def run_demo(
    out: str | None = None, *, epochs: int | None = None, blocks: int | None = None,
    lr: float | None = None, batch_size: int | None = None, rows: int | None = None,
    seed: int = 0, overwrite: bool = False, quiet: bool = False,
) -> FitOutcome:  # fmt: skip
    """Runs :data:`DEMO` (``None`` keeps the demo's value) into ``out``, by default the
    first free ``pyro-lunet-demo``, ``pyro-lunet-demo-2``, ...; prints how close the fit
    came to the true density and what to try next."""
    given = {"epochs": epochs, "blocks": blocks, "lr": lr, "batch_size": batch_size,
             "rows": rows}  # fmt: skip
    options = replace(
        DEMO, **{k: v for k, v in given.items() if v is not None}, seed=seed,
        overwrite=overwrite, quiet=quiet, out=str(out or free_name("pyro-lunet-demo")),
    )  # fmt: skip
    outcome = run_fit(options)
    m = outcome.metrics
    gap = m["val_nll"]["nats"] - m["true_val_nll"]["nats"]
    gaussian_gap = m["gaussian_val_nll"]["nats"] - m["true_val_nll"]["nats"]
    print(f"held-out NLL {gap:.2f} nats above the true density's (the best single Gaussian: "
          f"{gaussian_gap:.2f} above); see {outcome.out / 'density.png'}")  # fmt: skip
    print(DEMO_NEXT)
    return outcome


def demo(args: argparse.Namespace) -> int:
    """Fits a spline flow with LU mixers to a 2-D ring of Gaussians and writes a run folder."""
    # A 2-D flow on batches of 512 rows gives a second intra-op thread nothing to do but
    # wait: on the project's shared 2-core machine the demo's fit took over 100 CPU-s with
    # two threads, 15 with one. OMP_NUM_THREADS, when set, decides instead.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    run_demo(args.out, epochs=args.epochs, blocks=args.blocks, lr=args.lr,
             batch_size=args.batch_size, rows=args.rows, seed=args.seed,
             overwrite=args.overwrite, quiet=args.quiet)  # fmt: skip
    return 0
