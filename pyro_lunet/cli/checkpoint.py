"""Density models the command line fits, saved so they rebuild exactly.

A fitted model is ``TransformedDistribution(N(0, I), [flow, standardize])``:
the flow maps base noise to standardized data and the fixed
:class:`~pyro.distributions.transforms.AffineTransform` ``x = mean + scale * z``
maps that to the data's own units, so ``log_prob`` and ``sample`` speak the
data's units and the standardization's Jacobian (``-sum(log scale)``) is part
of every log-density.

A checkpoint is a folder holding ``config.json`` (what to build: the flow
spec, the dimension, the standardization, versions) and ``model.pt`` (the
flow's ``state_dict``, loaded with ``weights_only=True``). Folders are
written whole or not at all: :func:`write_folder` fills a hidden sibling and
renames it into place, marked (:data:`RUN_MARKER`) so that ``--overwrite``
later replaces only such a folder, never one of the user's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import ComposeTransformModule

from .._scoring import standard_normal
from ..flows import activation_flow, coupling_flow
from ..image_flows import image_flow, unit_interval
from ..transforms.lu_net import lu_net
from ..transforms.registry import FAMILIES

__all__ = [
    "BUILDERS",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "ModelConfig",
    "RUN_MARKER",
    "build_model",
    "discrete_config",
    "flow_names",
    "free_name",
    "load_model",
    "parse_flow",
    "refuse_existing",
    "resolve",
    "save_model",
    "write_file",
    "write_folder",
]

CHECKPOINT_FORMAT = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.pt"
#: The file :func:`write_folder` marks its folders with, listing what it wrote.
RUN_MARKER = ".pyro-lunet-run"

#: Flow builders by name: ``name -> builder(D, blocks, family)``, all oriented for
#: density models. A spec is ``builder:family`` (``coupling:butterfly``) or a bare
#: builder name (its default family, LU); ``lu-net`` is the paper's network.
#: In low dimension activation flows start every linear layer from a Haar-random
#: rotation (``init="orthogonal"``): from the identity all activations act on the
#: data's own axes, and a 2-D fit stalls near the best single Gaussian (LU-Net on
#: the eight-Gaussian ring: 3.59 nats from the identity, 2.7 to 3.1 from rotations,
#: 3.56 for the Gaussian). In high dimension the identity, an elementwise start,
#: is the better one (digits, D=64: 127.3 nats from the identity, 139.0 from
#: rotations, 130.2 for the Gaussian). Coupling flows rotate their later mixers.
ROTATE_UP_TO = 8


def _init(dim: int) -> dict:
    return {"init": "orthogonal" if dim <= ROTATE_UP_TO else "identity"}


BUILDERS: dict[str, Callable[[int, int, str], ComposeTransformModule]] = {
    "lu-net": lambda d, k, family: lu_net(d, k, role="density", **_init(d)),
    "activation": lambda d, k, family: activation_flow(
        d, k, family, role="density", layer_kwargs=_init(d)
    ),
    "coupling": lambda d, k, family: coupling_flow(d, k, family, role="density"),
    "spline": lambda d, k, family: coupling_flow(d, k, family, role="density", coupling="spline"),
    # Rows that are H x W images: built by image_rows_flow, which needs the image shape.
    "image": None,
}

#: The image flows' coupling networks' width (``hidden_channels``) on the command line.
IMAGE_HIDDEN_CHANNELS = 32
#: The logit map's margin (:func:`~pyro_lunet.image_flows.unit_interval`) of discrete images.
UNIT_INTERVAL_ALPHA = 0.05


def image_rows_flow(
    dim: int, blocks: int, family: str, image_shape: list[int] | None
) -> ComposeTransformModule:
    """``--flow image:FAMILY``: rows of ``H * W`` values as 1 x H x W images through
    :func:`~pyro_lunet.image_flow` (``blocks`` steps per level, two levels where the image
    halves twice, else one), reshaped back to rows so the model stays a density on rows."""
    if not image_shape:
        raise CheckpointError(
            "--flow image:FAMILY needs rows that are images: pass --image-shape HxW "
            "(the digits know theirs)"
        )
    height, width = image_shape
    levels = 0
    while levels < 2 and height % (2 << levels) == 0 and width % (2 << levels) == 0:
        levels += 1
    if levels == 0:
        raise CheckpointError(
            f"--flow image:FAMILY squeezes 2x2 pixels: it needs an even image height and "
            f"width, got {height}x{width}"
        )
    shape = (dim // (height * width), height, width)
    images = image_flow(shape, num_levels=levels, steps_per_level=blocks, layer=family,
                        hidden_channels=IMAGE_HIDDEN_CHANNELS)  # fmt: skip
    to_images = dist.transforms.ReshapeTransform((dim,), shape)
    return ComposeTransformModule([to_images, images, to_images.inv])


class CheckpointError(ValueError):
    """A flow spec, checkpoint folder or output folder that cannot be used."""


def _family_names() -> list[str]:
    """The registered families, as the command line spells them (dashes)."""
    return [name.replace("_", "-") for name in FAMILIES]


def flow_names() -> list[str]:
    """Every valid ``--flow`` value."""
    specs = ["lu-net"]
    for builder in BUILDERS:
        if builder != "lu-net":
            specs += [f"{builder}:{family}" for family in _family_names()]
    return specs


def parse_flow(spec: str) -> tuple[str, str]:
    """``"coupling:rank-one"`` -> ``("coupling", "rank_one")``; a bare builder means LU.

    :raises CheckpointError: for an unknown builder or family, listing the valid ones.
    """
    builder, _, family = spec.partition(":")
    family = (family or "lu").replace("-", "_")
    if (
        builder not in BUILDERS
        or family not in FAMILIES
        or (builder == "lu-net" and family != "lu")
    ):
        raise CheckpointError(
            f"unknown flow {spec!r}; expected lu-net or BUILDER:FAMILY with BUILDER one of "
            f"{', '.join(b for b in BUILDERS if b != 'lu-net')} and FAMILY one of "
            f"{', '.join(_family_names())}"
        )
    return builder, family


@dataclass
class ModelConfig:
    """Everything, besides the weights, that rebuilds a fitted model (``config.json``)."""

    flow: str
    blocks: int
    input_dim: int
    mean: list[float]
    scale: list[float]
    dtype: str = "float32"
    image_shape: list[int] | None = None
    #: Grey levels ``L`` of discrete images (integers ``0..L-1``), else ``None``.
    levels: int | None = None
    data: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    format: int = CHECKPOINT_FORMAT

    def to_json(self) -> str:
        # Python's float repr round-trips float64 exactly, so the
        # standardization rebuilds bit for bit.
        return json.dumps(asdict(self), indent=2)


def build_model(
    config: ModelConfig, device: torch.device | str = "cpu"
) -> tuple[dist.TransformedDistribution, ComposeTransformModule]:
    """The model (in data units) and its trainable flow (in standardized units), fresh.

    The flow's parameters start from the builder's initialization; load a
    ``state_dict`` into the flow to restore a fit.
    """
    builder, family = parse_flow(config.flow)
    dtype = getattr(torch, config.dtype)
    if builder == "image":
        flow = image_rows_flow(config.input_dim, config.blocks, family, config.image_shape)
    else:
        flow = BUILDERS[builder](config.input_dim, config.blocks, family)
    flow = flow.to(device, dtype)
    like = torch.empty((), device=device, dtype=dtype)
    mean, scale = (like.new_tensor(v) for v in (config.mean, config.scale))
    standardize = dist.transforms.AffineTransform(mean, scale, event_dim=1)
    transforms = [flow, standardize]
    if config.levels is not None:
        if builder != "image":
            raise CheckpointError(f"levels={config.levels} is for image flows, not {config.flow}")
        # the flow's output into the unit cube, then (the standardization's slot) y = L u
        cube = dist.transforms.IndependentTransform(unit_interval(UNIT_INTERVAL_ALPHA), 1)
        transforms = [flow, cube, standardize]
    model = dist.TransformedDistribution(standard_normal(config.input_dim, like), transforms)
    return model, flow


def discrete_config(levels: int, dim: int) -> dict:
    """``mean`` and ``scale`` of a discrete-image config: ``y = 0 + L u`` in every column."""
    return {"mean": [0.0] * dim, "scale": [float(levels)] * dim}


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path``: the folder itself or a file inside it."""
    folder = Path(path)
    if folder.is_file() and folder.name in (CONFIG_FILE, WEIGHTS_FILE):
        folder = folder.parent
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a folder holding {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}, as `pyro-lunet fit` writes)"
        )
    return folder


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[dist.TransformedDistribution, ModelConfig]:
    """Rebuilds a saved model exactly, in eval mode, on ``device``."""
    folder = resolve(path)
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
        if raw.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{folder}: checkpoint format {raw.get('format')!r}, this version reads "
                f"{CHECKPOINT_FORMAT}"
            )
        config = ModelConfig(**raw)
        model, flow = build_model(config, device)
        state = torch.load(folder / WEIGHTS_FILE, map_location=device, weights_only=True)
        flow.load_state_dict(state)
    except CheckpointError:
        raise
    except Exception as error:  # a damaged file can fail in any of torch.load's layers
        raise CheckpointError(f"{folder}: damaged checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0]})") from None  # fmt: skip
    flow.eval()
    return model, config


def save_model(folder: Path, flow: torch.nn.Module, config: ModelConfig) -> None:
    """Writes ``config.json`` and ``model.pt`` into ``folder`` (use inside :func:`write_folder`)."""
    (folder / CONFIG_FILE).write_text(config.to_json())
    torch.save(flow.state_dict(), folder / WEIGHTS_FILE)


def refuse_existing(
    out: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
    *, folder: bool = False,
) -> None:  # fmt: skip
    """Refuses an output path that exists, unless ``overwrite``, and one that would replace
    or hold any of ``inputs`` (the files the command reads), even with it.

    ``--overwrite`` replaces outputs, never inputs: nothing is replaced silently
    and nothing the user did not ask for is replaced at all. A ``folder`` output
    replaces only a folder :func:`write_folder` wrote and nobody added to since.
    """
    out = Path(out)
    target = out.resolve()
    for path in map(Path, inputs):
        if path.exists() and (target == path.resolve() or target in path.resolve().parents):
            raise CheckpointError(f"{out}: would replace the input {path}; pick another name")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise CheckpointError(f"{out}: already exists; pick another name or pass --overwrite")
    if not folder:
        return
    if out.is_symlink() or not out.is_dir():
        raise CheckpointError(f"{out}: not a folder; pick another name for the output folder")
    written = _written(out)
    foreign = sorted({p.name for p in out.iterdir()} - written)
    if foreign and not written:
        raise CheckpointError(f"{out}: not a run folder pyro-lunet wrote (no {RUN_MARKER}); "
                              "--overwrite replaces only those: pick another name")  # fmt: skip
    if foreign:
        raise CheckpointError(
            f"{out}: holds {foreign[0]!r}{' and more' * (len(foreign) > 1)}, added after "
            "pyro-lunet wrote the folder; --overwrite would delete it: move it or pick another name"
        )


def _written(folder: Path) -> set[str]:
    """The names :func:`write_folder` recorded in ``folder``'s marker (none: not its folder)."""
    try:
        return {*json.loads((folder / RUN_MARKER).read_text())["files"], RUN_MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


@contextmanager
def write_folder(
    out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yields a hidden scratch folder that becomes ``out`` only if the block completes.

    An existing ``out`` is refused unless ``overwrite`` (see :func:`refuse_existing`),
    and then replaced only once the new contents are complete; an error or
    interruption leaves no trace but the old folder. The new folder records what
    it holds in a marker file, :data:`RUN_MARKER`, which lets a later
    ``overwrite`` tell it from a folder of the user's.
    """
    out, inputs = Path(out), list(inputs)
    refuse_existing(out, overwrite, inputs, folder=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield scratch
        files = sorted(p.name for p in scratch.iterdir())
        (scratch / RUN_MARKER).write_text(json.dumps({"written_by": "pyro-lunet", "files": files}))
        if out.exists() or out.is_symlink():
            # Again: the block may have run for minutes, time enough to add a file to out.
            refuse_existing(out, overwrite, inputs, folder=True)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            scratch.rename(out)
            shutil.rmtree(old)
        else:
            scratch.rename(out)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)


def write_file(
    out: str | os.PathLike, write: Callable[[Path], None], overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
) -> None:  # fmt: skip
    """Calls ``write(scratch_path)`` and renames the result to ``out`` (atomic replace).

    ``out`` is refused as :func:`refuse_existing` refuses it, and where it is a folder.
    """
    out = Path(out)
    refuse_existing(out, overwrite, inputs)
    if out.is_dir():
        raise CheckpointError(f"{out}: is a folder; expected a file name")
    handle, scratch = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(handle)
    try:
        write(Path(scratch))
        os.replace(scratch, out)
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)


def free_name(base: str | os.PathLike) -> Path:
    """``base`` if it does not exist, else the first free ``base-2``, ``base-3``, ..."""
    base = Path(base)
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
