"""pyro-lunet: structured invertible linear layers for normalizing flows in Pyro."""

from . import datasets as datasets
from .autoguide import AutoFlowNormal
from .diagnostics import PSISDiagnostic, khat_reading, psis_khat, to_inference_data
from .flows import LAYERS, activation_flow, coupling_flow, layer_factory
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
    "AutoFlowNormal",
    "FitResult",
    "LAYERS",
    "Maintenance",
    "PSISDiagnostic",
    "PenalizedELBO",
    "RankOneScheduler",
    "activation_flow",
    "coupling_flow",
    "fit_density",
    "khat_reading",
    "layer_factory",
    "penalty",
    "psis_khat",
    "to_inference_data",
    "train_epoch",
    "train_val_split",
]
