"""The registry of transforms under contract; the checks are :mod:`pyro_lunet.testing`'s.

``tests/test_contract.py`` runs those checks over ``CASES``; a new family
joins by adding one :class:`Case` line there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pyro_lunet import testing

DIMS = (1, 2, 3, 5, 16, 64)


@dataclass(frozen=True)
class Case:
    """One transform under contract.

    :param name: the test id.
    :param make: ``input_dim -> module``, built in the default dtype; the
        suite perturbs every floating parameter so no check runs at identity.
    :param linear: whether the module is an ``InvertibleLinear`` (has
        ``weight()`` and ``log_abs_det()``).
    :param has_parameters: whether it has parameters (and so a dtype and
        device to validate inputs against, and something to train).
    :param dims: the dimensions to check.
    :param perturb: the scale of the random perturbation of parameters.
    :param prepare: optional ``module -> None`` run after the perturbation
        (e.g. to merge a rank-one update into its base, or re-sync an
        approximate inverse).
    :param guide: whether ``make`` is meant as an ``AutoNormalizingFlow``
        transform (checked by fitting a correlated Gaussian by SVI).
    """

    name: str
    make: Callable[[int], torch.nn.Module]
    linear: bool = True
    has_parameters: bool = True
    dims: tuple[int, ...] = DIMS
    perturb: float = 0.1
    prepare: Callable[[torch.nn.Module], None] | None = None
    guide: bool = True

    def build(
        self,
        dim: int,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> torch.nn.Module:
        """``make(dim)`` as :func:`pyro_lunet.testing.check_layer` builds it."""
        return testing.build(self.make, dim, dtype, device, self.perturb, self.prepare, seed)

    def __repr__(self) -> str:  # shown as the pytest id
        return self.name
