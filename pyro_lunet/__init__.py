"""pyro-lunet: structured invertible linear layers for normalizing flows in Pyro."""

from . import datasets as datasets
from .autoguide import AutoFlowNormal
from .conditional import (
    ConditionalChannelMixer,
    ConditionalFlow,
    ConditionalStructuredLinear,
    ConditionedChannelMixer,
    ConditionedStructuredLinear,
    conditional_butterfly_linear,
    conditional_channel_mixer,
    conditional_circulant_diagonal_linear,
    conditional_flow,
    conditional_linear,
    conditional_lu_linear,
    conditional_rank_one_updated_linear,
    conditional_self_normalizing_linear,
)
from .diagnostics import PSISDiagnostic, khat_reading, psis_khat, to_inference_data
from .flows import LAYERS, activation_flow, coupling_flow, layer_factory
from .image_flows import ActNorm, ConvAffineCoupling, bits_per_dim, image_flow
from .rank_one_scheduler import RankOneScheduler
from .training import (
    FitResult,
    Maintenance,
    PenalizedELBO,
    fit_density,
    penalty,
    train_epoch,
    train_val_split,
)
from .transforms import *  # noqa: F403
from .transforms import __all__ as _transforms_all

__version__ = "0.1.0"
__all__ = [
    *_transforms_all,
    "ActNorm",
    "AutoFlowNormal",
    "ConvAffineCoupling",
    "ConditionalChannelMixer",
    "ConditionalFlow",
    "ConditionalStructuredLinear",
    "ConditionedChannelMixer",
    "ConditionedStructuredLinear",
    "FitResult",
    "LAYERS",
    "Maintenance",
    "PSISDiagnostic",
    "PenalizedELBO",
    "RankOneScheduler",
    "activation_flow",
    "bits_per_dim",
    "conditional_butterfly_linear",
    "conditional_channel_mixer",
    "conditional_circulant_diagonal_linear",
    "conditional_flow",
    "conditional_linear",
    "conditional_lu_linear",
    "conditional_rank_one_updated_linear",
    "conditional_self_normalizing_linear",
    "coupling_flow",
    "fit_density",
    "image_flow",
    "khat_reading",
    "layer_factory",
    "penalty",
    "psis_khat",
    "to_inference_data",
    "train_epoch",
    "train_val_split",
]

# zuko adapters (optional dependency): importable from the top level without
# making zuko a requirement; ``pyro_lunet.zuko`` is imported on first access.
_ZUKO_NAMES = ("PyroLazyTransform", "StructuredLinearTransform", "to_zuko")


def __getattr__(name: str):
    if name in _ZUKO_NAMES:
        from . import zuko

        return getattr(zuko, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
