"""``pyro_lunet.testing.check_layer`` on a family written outside the package."""

from __future__ import annotations

import pytest
import torch

from pyro_lunet.testing import check_layer
from pyro_lunet.transforms import InvertibleLinear


class Householder(InvertibleLinear):
    """A reflection ``y = (I - 2 v v^T / |v|^2) x + b``: orthogonal, ``log|det| = 0``."""

    def __init__(self, input_dim: int, bias: bool = True, cache_size: int = 1):
        super().__init__(input_dim, bias=bias, cache_size=cache_size)
        self.v = torch.nn.Parameter(torch.randn(input_dim))

    def _matvec(self, x):
        v = self.v
        return x - 2 * (x @ v).unsqueeze(-1) * v / (v @ v)

    def _solve(self, y):
        return self._matvec(y)  # a reflection is its own inverse

    def _log_abs_det(self):
        return self.v.new_zeros(())

    def _dense(self):
        eye = torch.eye(self.input_dim, dtype=self.v.dtype, device=self.v.device)
        return self._matvec(eye).T


def householder(input_dim: int, **kwargs) -> Householder:
    return Householder(input_dim, **kwargs)


class WrongLogDet(Householder):
    def _log_abs_det(self):
        return self.v.new_full((), 0.01)


class SlightlyOffInverse(Householder):
    def _solve(self, y):
        return self._matvec(y) * (1 + 1e-6)


def test_householder_passes_check_layer():
    # One reflection cannot fit a correlated Gaussian: the guide check is off.
    check_layer(householder, guide=False)


def test_householder_passes_check_layer_in_float32():
    check_layer(householder, dims=(1, 5, 16), dtype=torch.float32, guide=False)


@pytest.mark.parametrize(
    ("make", "promise"),
    [
        (WrongLogDet, "log_abs_det_jacobian disagrees with autograd's Jacobian at D=1"),
        (SlightlyOffInverse, "inverse's Jacobian is not the inverse of the forward's at D=1"),
    ],
    ids=["wrong-log-det", "inverse-off"],
)
def test_a_broken_layer_fails_naming_the_promise(make, promise):
    with pytest.raises(AssertionError, match=f"^check_layer\\({make.__name__}\\): .*{promise}"):
        check_layer(make, guide=False)


def test_a_layer_that_cannot_train_fails_the_guide_check():
    with pytest.raises(AssertionError, match="guide does not fit a correlated 4-D Gaussian"):
        check_layer(householder, dims=(2,))
