"""pyro-lunet: structured invertible linear layers for normalizing flows in Pyro."""

from .rank_one_scheduler import RankOneScheduler
from .training import penalty
from .transforms import *  # noqa: F403
from .transforms import __all__ as _transforms_all

__version__ = "0.1.0"
__all__ = [*_transforms_all, "RankOneScheduler", "penalty"]
