"""Rank-one-updated layers (P4Inv): merges, penalty, drift correction and the scheduler."""

from __future__ import annotations

import doctest
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from torch.utils._python_dispatch import TorchDispatchMode

import pyro_lunet
from pyro_lunet import RankOneScheduler, RankOneUpdatedLinear, rank_one_updated_linear
from pyro_lunet.transforms import rank_one

F64 = torch.float64


def _layer(dim=6, init="identity", seed=0, scale=0.5, **kw) -> RankOneUpdatedLinear:
    """A float64 layer with a random bias and a random pending update ``u v^T``."""
    torch.manual_seed(seed)
    layer = rank_one_updated_linear(dim, init=init, **kw).to(F64)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
        layer.u.copy_(torch.randn(dim) * scale / dim**0.5)
    return layer


def _snapshot(layer) -> dict[str, torch.Tensor]:
    """Parameters and buffers (not the maintenance counters: every merge attempt draws)."""
    state = layer.state_dict()
    state.pop("_extra_state")
    return {k: v.detach().clone() for k, v in state.items()}


def _assert_consistent(layer, tol=1e-10):
    """A^-1, log|det A| and its sign agree with A."""
    eye = torch.eye(layer.input_dim, dtype=layer.A.dtype)
    assert (layer.A @ layer.A_inv - eye).abs().max() < tol
    sign, log_abs_det = torch.linalg.slogdet(layer.A)
    torch.testing.assert_close(layer.log_abs_det_A, log_abs_det, rtol=0, atol=tol)
    assert layer.sign_det_A == sign


def _standard_normal(dim, dtype=F64):
    zero = torch.zeros(dim, dtype=dtype)
    return dist.Normal(zero, torch.ones_like(zero)).to_event(1)


def test_docstring_examples_run():
    for module in (rank_one, pyro_lunet.rank_one_scheduler):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0


# ------------------------------------------------------------------- inits
@pytest.mark.parametrize("dim", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("init", ["identity", "reverse", "orthogonal"])
def test_named_inits_are_consistent(init, dim):
    torch.manual_seed(dim)
    layer = rank_one_updated_linear(dim, init=init).to(F64)
    _assert_consistent(layer, tol=1e-12)  # built in float32, refreshed by .to(float64)
    assert layer.u.abs().max() == 0
    if init == "reverse":
        assert torch.equal(layer.A, torch.eye(dim, dtype=F64).flip(0))
    if init == "identity":
        assert torch.equal(layer.A, torch.eye(dim, dtype=F64))


def test_init_from_a_matrix():
    torch.manual_seed(0)
    matrix = torch.randn(5, 5, dtype=F64) + 3 * torch.eye(5, dtype=F64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        layer = rank_one_updated_linear(5, init=matrix)
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(layer.A, matrix)
    _assert_consistent(layer, tol=1e-12)
    torch.testing.assert_close(layer.weight(), matrix)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="singular"):
        rank_one_updated_linear(3, init=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        rank_one_updated_linear(3, init=torch.eye(4))
    with pytest.raises(ValueError, match="reverse"):
        rank_one_updated_linear(3, init="eye")
    with pytest.raises(ValueError, match="low < high"):
        rank_one_updated_linear(3, log_det_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="pair"):
        rank_one_updated_linear(3, log_det_range=1.0)
    with pytest.raises(ValueError, match="penalty_weight"):
        rank_one_updated_linear(3, penalty_weight=-1.0)
    with pytest.raises(ValueError, match="input_dim"):
        rank_one_updated_linear(0)
    with pytest.raises(ValueError, match="steps"):
        rank_one_updated_linear(3).correct_(-1)


def test_buffers_are_state_and_follow_to():
    layer = rank_one_updated_linear(4)
    state = layer.state_dict()
    for name in ("A", "A_inv", "log_abs_det_A", "sign_det_A", "u", "v", "bias"):
        assert name in state
    assert {n for n, _ in layer.named_parameters()} == {"u", "v", "bias"}
    layer = layer.to(F64)
    state = layer.state_dict()
    assert state.pop("_extra_state").dtype == torch.int64  # the maintenance counters
    assert all(t.dtype == F64 for t in state.values())


# -------------------------------------------------------------- the map
def test_map_log_det_and_inverse_match_the_dense_matrix():
    layer = _layer(7, init="orthogonal")
    weight = layer.A + torch.outer(layer.u, layer.v)
    x = torch.randn(5, 7, dtype=F64)
    y = layer(x)
    torch.testing.assert_close(y, x @ weight.T + layer.bias)
    torch.testing.assert_close(layer.inv(y.clone()), x)
    torch.testing.assert_close(layer.log_abs_det(), torch.linalg.slogdet(weight)[1])
    # eval mode computes the same exact map (no merge, no dropped update)
    layer.eval()
    torch.testing.assert_close(layer(x.clone()), y)


class _LargeTensorWatch(TorchDispatchMode):
    """Records every non-view operation that produces a tensor with >= ``limit`` elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit and not func.is_view:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("direction", ["density", "guide"])
def test_training_step_forms_no_dense_matrix(direction):
    """A is frozen: neither pass computes a D x D weight gradient (or any D x D tensor)."""
    dim, batch = 32, 3  # a batch's (3, 32) tensors stay far below D^2 = 1024 elements
    layer = _layer(dim)
    flow = dist.TransformedDistribution(_standard_normal(dim), [layer])
    data = torch.randn(batch, dim, dtype=F64)
    with _LargeTensorWatch(dim * dim) as watch:
        if direction == "density":
            loss = -flow.log_prob(data).mean()
        else:
            y = flow.rsample((batch,))
            loss = flow.log_prob(y).mean() + y.square().sum()
        loss = loss + pyro_lunet.penalty(layer)
        loss.backward()
    assert watch.seen == []
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


# ------------------------------------------------------------------ merges
@pytest.mark.parametrize("init", ["identity", "reverse", "orthogonal"])
@pytest.mark.parametrize("dim", [1, 5, 32])
def test_merge_leaves_the_map_unchanged(init, dim):
    # A wide range: five random updates may walk log|det A| out of the default one.
    layer = _layer(dim, init=init, seed=dim, log_det_range=(-50.0, 50.0))
    x = torch.randn(9, dim, dtype=F64)
    for _ in range(5):
        y, x_back, log_det = layer(x.clone()), layer.inv(x.clone()), layer.log_abs_det()
        v_old = layer.v.detach().clone()
        merged = layer.merge_()
        assert isinstance(merged, torch.Tensor) and merged.dtype == torch.bool and merged
        assert (layer(x.clone()) - y).abs().max() < 1e-10
        assert (layer.inv(x.clone()) - x_back).abs().max() < 1e-10
        torch.testing.assert_close(layer.log_abs_det(), log_det, rtol=0, atol=1e-10)
        # the update now lives in A, and a fresh one starts from u = 0
        _assert_consistent(layer)
        assert layer.u.abs().max() == 0
        assert not torch.equal(layer.v, v_old)
        torch.testing.assert_close(layer.log_abs_det(), torch.linalg.slogdet(layer.A)[1])
        with torch.no_grad():
            layer.u.copy_(0.3 * torch.randn(dim) / dim**0.5)
    assert not torch.allclose(layer.A, rank_one_updated_linear(dim, init=init).A.to(F64))


def _with_delta(layer, delta):
    """Sets u so that 1 + v^T A^-1 u equals ``delta``."""
    with torch.no_grad():
        direction = layer.A @ layer.v  # v^T A^-1 (A v) = |v|^2
        layer.u.copy_(direction * (delta - 1) / layer.v.square().sum())
    return layer


def test_out_of_range_merge_is_skipped_unless_forced():
    layer = _layer(5, log_det_range=(-2.0, 1.0))
    _with_delta(layer, 10.0)  # log 10 = 2.3 > 1 + 0.5
    before = _snapshot(layer)
    assert not layer.merge_()
    after = _snapshot(layer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing moved at all
    assert layer.merge_(force=True)
    _assert_consistent(layer)
    torch.testing.assert_close(layer.log_abs_det_A, torch.tensor(10.0, dtype=F64).log())


@pytest.mark.parametrize("delta", [-1e-3, 1e-3])
def test_near_zero_denominator_is_skipped_unless_forced(delta):
    layer = _layer(5)
    _with_delta(layer, delta)
    before = _snapshot(layer)
    assert not layer.merge_()
    assert all(torch.equal(before[k], v) for k, v in _snapshot(layer).items())
    y = layer(torch.ones(1, 5, dtype=F64))
    assert layer.merge_(force=True)
    _assert_consistent(layer, tol=1e-9)
    assert layer.sign_det_A == (-1 if delta < 0 else 1)
    torch.testing.assert_close(layer(torch.ones(1, 5, dtype=F64)), y)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_unrepresentable_denominator_is_never_merged(dtype):
    layer = _layer(5).to(dtype)
    _with_delta(layer, 1e-12)
    before = _snapshot(layer)
    assert not layer.merge_(force=True)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(layer).items())
    _assert_consistent(layer, tol=1e-6)


@pytest.mark.parametrize("bad", ["u", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_update_is_reset_not_merged(bad, value):
    layer = _layer(5, init="orthogonal")
    with torch.no_grad():
        getattr(layer, bad)[2] = value
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    assert not layer.merge_(force=True)
    assert all(torch.equal(buffers[k], v) for k, v in layer.named_buffers())
    assert layer.u.abs().max() == 0 and torch.isfinite(layer.v).all()
    _assert_consistent(layer)


def test_merges_invalidate_cached_results():
    layer = _layer(4)
    x = torch.randn(3, 4, dtype=F64)
    with torch.no_grad():
        y = layer(x)
        log_det = layer.log_abs_det()
        layer.merge_()
        layer.u.fill_(0.1)  # a new update, after the merge
        assert not torch.allclose(layer(x), y)
        assert not torch.allclose(layer.log_abs_det(), log_det)


# ----------------------------------------------------------------- penalty
def test_penalty_is_the_soft_range_penalty():
    layer = _layer(5, log_det_range=(-2.0, 3.0), penalty_weight=0.3)
    assert layer.penalty() == 0  # delta near 1, log|det A| = 0
    for delta, log_det_a in [(1e-2, 0.0), (40.0, 0.0), (2.0, 2.8), (-0.05, -1.0)]:
        _with_delta(layer, delta)
        with torch.no_grad():
            layer.log_abs_det_A.fill_(log_det_a)
        t = torch.tensor([delta, delta], dtype=F64).abs().log() + torch.tensor([0, log_det_a])
        expected = 0.3 * ((-2.0 - t).clamp_min(0) ** 2 + (t - 3.0).clamp_min(0) ** 2).sum()
        value = layer.penalty()
        assert value > 0
        torch.testing.assert_close(value, expected)
        (grad_u,) = torch.autograd.grad(value, layer.u)
        assert torch.isfinite(grad_u).all() and grad_u.abs().sum() > 0


def test_pyro_lunet_penalty_sums_every_layer():
    layers = [_layer(4, seed=s, log_det_range=(-0.1, 0.1)) for s in range(2)]
    for layer, delta in zip(layers, (3.0, 0.5)):
        _with_delta(layer, delta)
    tree = torch.nn.Sequential(torch.nn.ModuleList(layers), torch.nn.Linear(4, 4).double())
    torch.testing.assert_close(pyro_lunet.penalty(tree), layers[0].penalty() + layers[1].penalty())


# -------------------------------------------------------------- correction
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-13), (torch.float32, 1e-5)])
def test_correction_removes_drift(dtype, tol):
    layer = _layer(32, init="orthogonal").to(dtype)
    layer.merge_()
    eye = torch.eye(32, dtype=dtype)
    with torch.no_grad():
        layer.A_inv.add_(2e-3 * torch.randn(32, 32, dtype=dtype) / 32**0.5)
        layer.log_abs_det_A.add_(1e-3)
    assert (layer.A @ layer.A_inv - eye).abs().max() > 1e-4
    layer.correct_()
    assert (layer.A @ layer.A_inv - eye).abs().max() < tol
    assert (layer.log_abs_det_A - torch.linalg.slogdet(layer.A)[1]).abs() > 5e-4  # untouched
    layer.correct_(steps=0, recompute_log_det=True)
    torch.testing.assert_close(layer.log_abs_det_A, torch.linalg.slogdet(layer.A)[1])


def test_correction_recovers_a_far_gone_inverse():
    layer = _layer(16, init="orthogonal")
    layer.merge_()
    with torch.no_grad():
        layer.A_inv.normal_()  # the hyper-power iteration would diverge from here
    layer.correct_()
    _assert_consistent(layer)
    with torch.no_grad():
        layer.A_inv.fill_(float("nan"))
    layer.correct_()
    _assert_consistent(layer)


def test_correction_order_is_eight():
    layer = _layer(8, init="orthogonal")
    eye = torch.eye(8, dtype=F64)
    with torch.no_grad():
        layer.A_inv.copy_(layer.A_inv @ (eye - 0.1 * torch.diag(torch.rand(8, dtype=F64))))
    residual = (eye - layer.A @ layer.A_inv).abs().max()
    layer.correct_()
    new = (eye - layer.A @ layer.A_inv).abs().max()
    assert new < 2 * residual**8 + 1e-15  # diagonal residual: R -> R^8 exactly


# --------------------------------------------------------------- scheduler
def _adam_setup(num_layers=2, dim=4):
    torch.manual_seed(0)
    layers = [rank_one_updated_linear(dim).double() for _ in range(num_layers)]
    other = torch.nn.Linear(dim, dim).double()
    tree = torch.nn.ModuleDict({"flow": torch.nn.ModuleList(layers), "other": other})
    opt = torch.optim.Adam(tree.parameters(), lr=0.01)
    loss = sum(layer(torch.randn(8, dim, dtype=F64)).square().sum() for layer in layers)
    (loss + other(torch.randn(8, dim, dtype=F64)).sum()).backward()
    opt.step()
    return layers, other, tree, opt


def test_scheduler_resets_exactly_the_merged_layers_v_state():
    layers, other, tree, opt = _adam_setup(num_layers=3)
    # The last layer's update cannot be merged: its v state must survive.
    layers[2].log_det_range = (-0.01, 0.01)
    _with_delta(layers[2], 2.0)
    scheduler = RankOneScheduler(tree, opt, merge_every=1, force_every=None)
    v_state = opt.state[layers[2].v]
    scheduler.step()
    for layer in layers[:2]:
        assert layer.v not in opt.state
        assert layer.u in opt.state and layer.bias in opt.state
    assert opt.state[layers[2].v] is v_state
    assert all(p in opt.state for p in other.parameters())
    assert scheduler.num_rounds == 1


def test_scheduler_resets_u_state_after_a_non_finite_update():
    layers, _, tree, opt = _adam_setup()
    with torch.no_grad():
        layers[0].u[0] = float("nan")
    RankOneScheduler(tree, opt, merge_every=1).step()
    assert layers[0].u not in opt.state and layers[0].v not in opt.state
    assert layers[1].u in opt.state and layers[1].v not in opt.state
    assert torch.isfinite(layers[0].u).all()


def test_scheduler_counts_rounds_forces_and_corrects():
    layers, _, tree, opt = _adam_setup(num_layers=1)
    calls = []
    layer = layers[0]
    merge, correct = layer._merge, layer.correct_

    def spy_merge(force):
        calls.append(("merge", force))
        return merge(force)

    def spy_correct(steps, recompute_log_det=False):
        calls.append(("correct", steps, recompute_log_det))
        return correct(steps, recompute_log_det=recompute_log_det)

    layer._merge, layer.correct_ = spy_merge, spy_correct
    scheduler = RankOneScheduler(
        tree,
        opt,
        merge_every=3,
        force_every=2,
        correct_every=4,
        correct_steps=2,
        recompute_log_det_every=8,
    )
    for _ in range(24):
        scheduler.step()
    merges = [c for c in calls if c[0] == "merge"]
    assert [force for _, force in merges] == [False, True] * 4
    assert [c for c in calls if c[0] == "correct"] == [("correct", 2, False), ("correct", 2, True)]
    assert scheduler.state_dict() == {"num_steps": 24, "num_rounds": 8}
    _assert_consistent(layer, tol=1e-12)
    # log-determinant recomputations without corrections of A^-1
    calls.clear()
    scheduler = RankOneScheduler(tree, None, merge_every=1, correct_every=None,
                                 recompute_log_det_every=2)  # fmt: skip
    for _ in range(4):
        scheduler.step()
    assert [c for c in calls if c[0] == "correct"] == [("correct", 0, True)] * 2


def test_scheduler_rejects_bad_arguments():
    layer = rank_one_updated_linear(3)
    with pytest.raises(ValueError, match="optimizer"):
        RankOneScheduler(layer, optimizer="adam")
    with pytest.raises(ValueError, match="merge_every"):
        RankOneScheduler(layer, merge_every=0)
    with pytest.raises(ValueError, match="module"):
        RankOneScheduler([layer, 3])


@pytest.mark.parametrize(
    "make_optim",
    [
        lambda: pyro.optim.Adam({"lr": 0.01}),
        lambda: pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.99}),
        lambda: pyro.optim.ExponentialLR(
            {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.01}, "gamma": 0.9}
        ),
    ],
    ids=["Adam", "ClippedAdam", "ExponentialLR"],
)
def test_scheduler_resets_pyro_optim_state_of_v_only(make_optim):
    pyro.clear_param_store()
    torch.manual_seed(0)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 2.0).to_event(1))

    guide = AutoNormalizingFlow(model, rank_one_updated_linear)
    optim = make_optim()
    svi = SVI(model, guide, optim, Trace_ELBO())
    scheduler = RankOneScheduler(guide, optim, merge_every=2)
    svi.step()
    scheduler.step()  # no round yet
    (layer,) = scheduler.layers()

    def state(p):
        inner = optim.optim_objs[p]
        return getattr(inner, "optimizer", inner).state.get(p)

    assert all(state(p) for p in (layer.u, layer.v, layer.bias))
    svi.step()
    scheduler.step()
    assert bool(torch.equal(layer.u, torch.zeros_like(layer.u)))  # merged
    assert not state(layer.v)
    assert state(layer.u) and state(layer.bias)
    # the per-parameter optimizer (and its learning-rate schedule) survives
    lrs = {getattr(o, "optimizer", o).param_groups[0]["lr"] for o in optim.optim_objs.values()}
    assert len(lrs) == 1
    svi.step()  # v's optimizer starts afresh
    assert state(layer.v)


# ------------------------------------------------------------- in training
def test_plain_pytorch_density_training_loop():
    torch.manual_seed(0)
    cov = torch.tensor([[2.0, 0.9, 0.3], [0.9, 1.0, -0.4], [0.3, -0.4, 0.8]], dtype=F64)
    data = dist.MultivariateNormal(torch.tensor([1.0, -1.0, 0.5], dtype=F64), cov).sample((1024,))
    layers = [rank_one_updated_linear(3).double()]
    params = torch.nn.ModuleList(layers)
    flow = dist.TransformedDistribution(_standard_normal(3), layers)
    opt = torch.optim.Adam(params.parameters(), lr=0.05)
    scheduler = RankOneScheduler(params, opt, merge_every=10, correct_every=20)
    for _ in range(300):
        opt.zero_grad()
        loss = -flow.log_prob(data).mean() + pyro_lunet.penalty(params)
        loss.backward()
        opt.step()
        scheduler.step()
    (layer,) = layers
    assert scheduler.num_rounds == 30
    _assert_consistent(layer, tol=1e-12)
    # one affine layer reaches the maximum-likelihood Gaussian only through merges
    mean, mle_cov = data.mean(0), torch.cov(data.T, correction=0)
    weight = layer.weight().detach()
    torch.testing.assert_close(weight @ weight.T, mle_cov, atol=0.02, rtol=0)
    torch.testing.assert_close(layer.bias.detach(), mean, atol=1e-3, rtol=0)
    with torch.no_grad():
        gap = dist.MultivariateNormal(mean, mle_cov).log_prob(data) - flow.log_prob(data)
    assert gap.mean() < 1e-3


def test_svi_with_auto_normalizing_flow():
    pyro.clear_param_store()
    torch.manual_seed(0)
    cov = torch.tensor([[2.0, 0.8, 0.3], [0.8, 1.0, 0.2], [0.3, 0.2, 0.5]])
    target = dist.MultivariateNormal(torch.tensor([1.0, -2.0, 0.5]), cov)

    def model():
        pyro.sample("z", target)

    guide = AutoNormalizingFlow(model, partial(rank_one_updated_linear, init="reverse"))
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True)

    def loss(model, guide, *args, **kwargs):
        return elbo.differentiable_loss(model, guide, *args, **kwargs) + pyro_lunet.penalty(guide)

    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995})
    svi = SVI(model, guide, optim, loss=loss)
    scheduler = RankOneScheduler(guide, optim, merge_every=5, correct_every=10)
    for _ in range(500):
        svi.step()
        scheduler.step()
    (layer,) = scheduler.layers()
    assert scheduler.num_rounds == 100
    _assert_consistent(layer, tol=1e-5)
    # the guide is the Gaussian N(b, W W^T): its KL to the target in closed form
    weight = layer.weight().detach()
    fitted = dist.MultivariateNormal(layer.bias.detach(), weight @ weight.T)
    assert torch.distributions.kl_divergence(fitted, target) < 0.03
    with torch.no_grad():
        z = guide.get_posterior().sample((20000,))
    torch.testing.assert_close(z.mean(0), target.mean, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.2, rtol=0)


# ---------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merges_and_training_never_synchronize():
    layer = _layer(64).to("cuda")
    params = torch.nn.ModuleList([layer])
    base = dist.Normal(torch.zeros(64, dtype=F64, device="cuda"), 1.0, validate_args=False)
    # (argument validation itself synchronizes, so it is off here)
    flow = dist.TransformedDistribution(base.to_event(1), [layer], validate_args=False)
    data = torch.randn(128, 64, dtype=F64, device="cuda")
    opt = torch.optim.Adam(params.parameters(), lr=0.01, capturable=True)
    scheduler = RankOneScheduler(params, None, merge_every=2, correct_every=2)
    opt.zero_grad()
    (-flow.log_prob(data).mean()).backward()
    opt.step()  # the first step allocates state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            opt.zero_grad()
            loss = -flow.log_prob(data).mean() + pyro_lunet.penalty(params)
            loss.backward()
            opt.step()
            scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.device.type == "cuda" for t in layer.state_dict().values())
    _assert_consistent(layer.cpu(), tol=1e-10)
