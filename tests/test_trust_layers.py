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


# ------------------------------------------------------------------ item 3
def _fit_rank_one_plainly(seed: int, steps: int = 200, optimizer=torch.optim.Adam):
    """A plain torch loop, no scheduler, no penalty: a correlated 3-D Gaussian."""
    torch.manual_seed(seed)
    layer = rank_one_updated_linear(3).double()
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.5, 0.3, 0.4]], dtype=torch.float64)
    data = torch.randn(512, 3, dtype=torch.float64) @ mix.T
    model = _model(layer, 3)
    opt = optimizer(layer.parameters(), lr=5e-2)
    for _ in range(steps):
        opt.zero_grad()
        (-model.log_prob(data).mean()).backward()
        opt.step()
    return layer, data, opt


def test_rank_one_merges_by_itself_in_a_plain_loop():
    layer, data, opt = _fit_rank_one_plainly(0, steps=400)
    assert layer._upkeep.rounds == 39  # the last step's round waits for the next use
    layer.log_abs_det()
    assert layer._upkeep.rounds == 40 and layer._upkeep.steps == 400
    assert not torch.allclose(layer.A, torch.eye(3, dtype=torch.float64))  # merged
    w = layer.weight().detach()
    cov = torch.cov(data.T, correction=0)
    # A + u v^T without merges is a rank-one change of I: it cannot reach cov.
    assert torch.linalg.matrix_norm(w @ w.T - cov) < 0.1
    # v's optimizer state is reset at each merge round (here the last, at step 400)
    assert layer.v not in opt.state or opt.state[layer.v]["step"] < 10


def test_rank_one_maintenance_is_deterministic_and_restored_from_state_dict():
    first, _, _ = _fit_rank_one_plainly(1, steps=95)
    second, _, _ = _fit_rank_one_plainly(1, steps=95)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    # A layer restored from a checkpoint draws the same next v as the original.
    restored = rank_one_updated_linear(3).double()
    restored.load_state_dict(first.state_dict())
    first.merge_(force=True)
    restored.merge_(force=True)
    assert torch.equal(first.v, restored.v)


def test_rank_one_leaves_merges_to_an_explicit_scheduler():
    from pyro_lunet import RankOneScheduler

    torch.manual_seed(0)
    layer = rank_one_updated_linear(3)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    scheduler = RankOneScheduler(layer, opt, merge_every=7)
    x = torch.randn(16, 3)
    for _ in range(21):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
        scheduler.step()
    assert scheduler.num_rounds == 3
    assert layer._upkeep.rounds == 0  # its own schedule (every 10) stood down
    assert layer._upkeep.draws == 3  # one fresh v per round, none twice


def test_rank_one_maintains_itself_under_pyro_optimizers():
    """Pyro's optimizers step one torch optimizer per parameter: counted once per step."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormalizingFlow

    pyro.clear_param_store()
    torch.manual_seed(0)

    def model():
        pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))

    guide = AutoNormalizingFlow(model, rank_one_updated_linear)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(30):
        svi.step()
    guide()  # the next use catches up
    layer = guide.transform
    assert layer._upkeep.steps == 30 and layer._upkeep.rounds == 3
