"""Structured invertible linear layers and activations, as Pyro ``TransformModule``s."""

from .base import InvertibleLinear, VersionedCacheModule
from .butterfly import ButterflyLinear, butterfly_linear
from .circulant import CirculantDiagonalLinear, circulant_diagonal_linear
from .leaky_softplus import LeakySoftplus, leaky_softplus
from .lu import LULinear, lu_linear
from .lu_net import lu_net
from .rank_one import RankOneUpdatedLinear, rank_one_updated_linear
from .self_normalizing import SelfNormalizingLinear, self_normalizing_linear

__all__ = [
    "ButterflyLinear",
    "CirculantDiagonalLinear",
    "InvertibleLinear",
    "LULinear",
    "LeakySoftplus",
    "RankOneUpdatedLinear",
    "SelfNormalizingLinear",
    "VersionedCacheModule",
    "butterfly_linear",
    "circulant_diagonal_linear",
    "leaky_softplus",
    "lu_linear",
    "lu_net",
    "rank_one_updated_linear",
    "self_normalizing_linear",
]
