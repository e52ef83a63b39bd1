"""Off the tested path: caches across grad changes, empty batches, drop-in training.

Each test here reproduces a behaviour a user met (issue 12) and asserts what must hold.
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyro_lunet import (
    butterfly_linear,
    circulant_diagonal_linear,
    lu_linear,
    lu_net,
    rank_one_updated_linear,
    self_normalizing_linear,
)

FAMILIES = {
    "lu": lu_linear,
    "butterfly": butterfly_linear,
    "circulant": circulant_diagonal_linear,
    "rank_one": rank_one_updated_linear,
    "self_normalizing": self_normalizing_linear,
}


def _perturbed(make, dim=5, seed=0):
    torch.manual_seed(seed)
    layer = make(dim).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _model(flow, dim):
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    return dist.TransformedDistribution(base, [flow])


def _grads(flow):
    return [None if p.grad is None else p.grad.clone() for p in flow.parameters()]


# ------------------------------------------------------------------ item 1
@pytest.mark.parametrize("name", ["lu", "butterfly", "circulant"])
def test_cache_is_not_served_across_unfreezing(name):
    flow = _perturbed(FAMILIES[name])
    model = _model(flow, 5)
    x = torch.randn(7, 5, dtype=torch.float64)
    flow.requires_grad_(False)
    model.log_prob(x)  # cached without a graph to the parameters
    flow.requires_grad_(True)
    model.log_prob(x).sum().backward()
    cached = _grads(flow)
    flow.zero_grad()
    flow.clear_cache()
    model.log_prob(x).sum().backward()
    for got, want in zip(cached, _grads(flow)):
        assert got is not None
        torch.testing.assert_close(got, want)


def test_cache_is_not_served_when_the_input_starts_requiring_grad():
    flow = _perturbed(lu_linear)
    model = _model(flow, 5)
    x = torch.randn(3, 5, dtype=torch.float64)
    model.log_prob(x)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(model.log_prob(x).sum(), x)
    # d log p / dx of a linear flow over N(0, I): -(W^-1)^T W^-1 (x - b)
    w_inv = torch.linalg.inv(flow.weight().detach())
    expected = -((x.detach() - flow.bias.detach()) @ w_inv.T) @ w_inv
    torch.testing.assert_close(grad, expected)


def test_cache_is_not_served_after_the_input_changes_in_place():
    flow = _perturbed(lu_linear)
    x = torch.randn(3, 5, dtype=torch.float64)
    y = flow(x)
    with torch.no_grad():
        x.mul_(2)
    torch.testing.assert_close(flow(x), x @ flow.weight().T + flow.bias)
    assert flow(x) is not y


def test_rsample_then_log_prob_still_skips_the_inverse():
    flow = _perturbed(lu_linear)
    x = torch.randn(3, 5, dtype=torch.float64)
    y = flow(x)
    assert flow.inv(y) is x  # the cached pair: no solve


# ------------------------------------------------------------------ item 6
@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empty_batch(name, mode):
    flow = _perturbed(FAMILIES[name])
    getattr(flow, mode)()
    empty = torch.zeros(0, 5, dtype=torch.float64)
    y = flow(empty)
    assert y.shape == (0, 5)
    assert flow.log_abs_det_jacobian(empty, y).shape == (0,)
    assert flow.inv(empty.clone()).shape == (0, 5)
    # (TransformedDistribution.log_prob cannot take it: torch's own
    # Independent.log_prob of (0, D) fails in _sum_rightmost's reshape)
    penalty = getattr(flow, "penalty", None)
    if penalty is not None:
        assert torch.isfinite(penalty())


def test_lu_net_on_an_empty_batch():
    flow = lu_net(3, num_blocks=2).double()
    empty = torch.zeros(0, 3, dtype=torch.float64)
    assert flow.inv(empty).shape == (0, 3)
    assert flow(empty).shape == (0, 3)
    # (its log_abs_det_jacobian cannot: torch's ComposeTransform sums the
    # elementwise activation's terms with a reshape that refuses (0, D))
