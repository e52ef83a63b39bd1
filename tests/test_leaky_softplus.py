"""The leaky softplus activation."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_lunet import LeakySoftplus, leaky_softplus


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5, 0.9])
def test_inverse_to_precision_for_large_inputs(dtype, tol, alpha):
    act = leaky_softplus(alpha)
    x = torch.cat([torch.linspace(-1e4, 1e4, 20001, dtype=dtype), torch.randn(1000, dtype=dtype)])
    back = act.phi_inverse(act.phi(x))
    assert ((back - x).abs() / (1 + x.abs())).max() < tol * (1 / alpha)


def test_log_derivative_is_stable_and_exact():
    act = leaky_softplus(0.1)
    x = torch.tensor([-1e4, -50.0, -1.0, 0.0, 2.0, 50.0, 1e4], dtype=torch.float64)
    expected = torch.log(0.1 + 0.9 * torch.sigmoid(x))
    torch.testing.assert_close(act.log_phi_prime(x), expected)
    assert act.log_phi_prime(torch.tensor(-1e30)).item() == pytest.approx(math.log(0.1))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(act.phi(x).sum(), x)
    torch.testing.assert_close(grad.log(), expected)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5, 2.0])
def test_alpha_outside_open_unit_interval_is_a_value_error(alpha):
    with pytest.raises(ValueError, match="alpha"):
        LeakySoftplus(alpha)


def test_inverse_flag_swaps_directions():
    fwd, inv = leaky_softplus(0.2), leaky_softplus(0.2, inverse=True)
    x = torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(inv(x.clone()), fwd.inv(x.clone()))
    y = inv(x)
    torch.testing.assert_close(inv.log_abs_det_jacobian(x, y), -fwd.log_abs_det_jacobian(y, x))


def test_follows_input_dtype_without_host_sync():
    act = leaky_softplus()
    for dtype in (torch.float32, torch.float64):
        y = act.inv(torch.randn(5, dtype=dtype))
        assert y.dtype == dtype
