"""Structured invertible linear layers and activations, as Pyro ``TransformModule``s.

Each family's module registers it in :data:`~pyro_lunet.transforms.registry.FAMILIES`
when imported; the imports below fix the order :func:`families` lists them in.
"""

from .registry import FAMILIES, Family, FamilyRegistry, families, register_family

# isort: split
from .lu import LULinear, lu_linear  # the default family, listed first

# isort: split
from .base import ROLES, InvertibleLinear, Role, VersionedCacheModule
from .butterfly import ButterflyLinear, butterfly_linear
from .channel_mixer import ChannelMixer, ImageMixer, channel_mixer, image_mixer
from .circulant import CirculantDiagonalLinear, circulant_diagonal_linear
from .flow import Flow
from .leaky_softplus import LeakySoftplus, leaky_softplus
from .lu_net import lu_net
from .rank_one import RankOneUpdatedLinear, rank_one_updated_linear
from .self_normalizing import SelfNormalizingLinear, self_normalizing_linear

__all__ = [
    "FAMILIES",
    "ROLES",
    "ButterflyLinear",
    "ChannelMixer",
    "CirculantDiagonalLinear",
    "Family",
    "FamilyRegistry",
    "Flow",
    "ImageMixer",
    "InvertibleLinear",
    "LULinear",
    "LeakySoftplus",
    "RankOneUpdatedLinear",
    "Role",
    "SelfNormalizingLinear",
    "VersionedCacheModule",
    "butterfly_linear",
    "channel_mixer",
    "circulant_diagonal_linear",
    "families",
    "image_mixer",
    "leaky_softplus",
    "lu_linear",
    "lu_net",
    "rank_one_updated_linear",
    "register_family",
    "self_normalizing_linear",
]
