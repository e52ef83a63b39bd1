"""The contract every transform of pyro-lunet honours, as reusable checks.

``tests/test_contract.py`` runs these checks over ``CASES``; a new family
joins by adding one :class:`Case` line there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributions.utils import _sum_rightmost

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

    def build(self, dim: int, dtype: torch.dtype = torch.float64, seed: int = 0):
        torch.manual_seed(seed)
        module = self.make(dim).to(dtype)
        with torch.no_grad():
            for p in module.parameters():
                if p.is_floating_point():
                    p.add_(self.perturb * torch.randn_like(p))
        if self.prepare is not None:
            self.prepare(module)
        return module

    def __repr__(self) -> str:  # shown as the pytest id
        return self.name


def total_log_det(transform, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log|det J|`` of the map on R^D, summed over elementwise event dims."""
    return _sum_rightmost(transform.log_abs_det_jacobian(x, y), 1 - transform.domain.event_dim)


def jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(fn, x)


def forward(transform, x: torch.Tensor) -> torch.Tensor:
    """``transform(x)`` computed afresh (a new tensor cannot hit a cache)."""
    return transform(x.clone())


def inverse(transform, y: torch.Tensor) -> torch.Tensor:
    """``transform.inv(y)`` computed afresh."""
    return transform.inv(y.clone())
