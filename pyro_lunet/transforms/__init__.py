"""Structured invertible linear layers and activations, as Pyro ``TransformModule``s."""

from .base import InvertibleLinear, VersionedCacheModule
from .leaky_softplus import LeakySoftplus, leaky_softplus
from .lu import LULinear, lu_linear
from .lu_net import lu_net

__all__ = [
    "InvertibleLinear",
    "LULinear",
    "LeakySoftplus",
    "VersionedCacheModule",
    "leaky_softplus",
    "lu_linear",
    "lu_net",
]
