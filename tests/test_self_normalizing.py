"""Self-normalizing layers (SNF): surrogate gradients, penalty, log-det tracking, fits."""

from __future__ import annotations

import copy
import doctest
import math
import pickle
import warnings
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

import pyro_lunet
from pyro_lunet import leaky_softplus, self_normalizing_linear
from pyro_lunet.transforms import self_normalizing as snf_module
from tests.test_self_normalizing_dropin import correlated_gaussian

# The side W is applied on: "forward" is role="guide", "inverse" role="density".
DIRECTIONS = ["forward", "inverse"]
ROLE = {"forward": "guide", "inverse": "density"}


@pytest.fixture(autouse=True)
def _probes_below_the_batch(monkeypatch):
    """Random probes as soon as N < D, so small problems exercise them (the layer's
    minimum of 32 probes is checked in ``test_at_least_32_probes_by_default``)."""
    monkeypatch.setattr(snf_module, "_MIN_PROBES", 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(dim, exact="inverse", seed=0, scale=0.3, sync=False, **kwargs):
    """A float64 layer with W away from the identity and R != W^-1 (unless ``sync``)."""
    torch.manual_seed(seed)
    layer = self_normalizing_linear(dim, role=ROLE[exact], **kwargs).double()
    with torch.no_grad():
        layer.W.add_(scale * torch.randn(dim, dim, dtype=torch.float64))
        layer.R.add_(scale * torch.randn(dim, dim, dtype=torch.float64))
        if layer.bias is not None:
            layer.bias.add_(torch.randn(dim, dtype=torch.float64))
    if sync:
        layer.sync_inverse()
    return layer


def _exact_side(layer, x):
    """``(output, u)``: the exact side applied to ``x`` and W's own input."""
    if layer.role == "guide":
        return layer(x), x
    return layer.inv(x), x - (0 if layer.bias is None else layer.bias)


def _grads(layer):
    return {name: p.grad.clone() for name, p in layer.named_parameters()}


def _zero_grads(layer):
    for p in layer.parameters():
        p.grad = None


def _standard_normal(dim, dtype=torch.float64):
    zero = torch.zeros(dim, dtype=dtype)
    return dist.Normal(zero, torch.ones_like(zero)).to_event(1)


# ------------------------------------------------------------ the gradients
def _probes_of_seed(seed, rows, dim):
    """``(P, weight)``: the probes a training forward draws right after ``manual_seed(seed)``."""
    if dim <= rows:
        return torch.eye(dim, dtype=torch.float64), 1.0
    torch.manual_seed(seed)
    return torch.randn(rows, dim, dtype=torch.float64), 1.0 / rows


def _inverse_error(layer):
    """``R W - I`` of the layer's current parameters (a constant)."""
    W, R = layer.W.detach(), layer.R.detach()
    return R @ W - torch.eye(W.shape[0], dtype=W.dtype)


@pytest.mark.parametrize("exact", DIRECTIONS)
@pytest.mark.parametrize("batch", [(9,), (3, 4), (4,)], ids=str)  # (4,): N < D, random probes
@pytest.mark.parametrize("weight", [None, 2.5], ids=["built-in", "2.5 penalty"])
def test_surrogate_gradients_match_the_formulas(exact, batch, weight):
    """The paper's surrogate gradients plus the gradient of lambda ||(R W - I) P^T||^2 / rows.

    With no penalty in the loss the layer applies the term with weight
    lambda itself; ``c * penalty()`` in the loss makes it c * lambda.
    """
    dim, lam, c = 6, 0.7, 2.5
    layer = _layer(dim, exact, reconstruction_weight=lam)
    W, R = layer.W.detach(), layer.R.detach()
    x = torch.randn(*batch, dim, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*batch, dim, dtype=torch.float64)
    torch.manual_seed(123)  # the probes, when N < D
    out, _ = _exact_side(layer, x)
    loss = (upstream * out).sum() + c * layer.log_abs_det()
    if weight is not None:
        loss = loss + weight * pyro_lunet.penalty(layer)
    loss.backward()

    # The formulas, on rows: z = u W^T, G = dL/dz, c_W = dL/dlog|det W|.
    u = (x.detach() if exact == "forward" else x.detach() - layer.bias.detach()).reshape(-1, dim)
    G = upstream.reshape(-1, dim)
    c_w = c if exact == "forward" else -c
    z = u @ W.T
    eye = torch.eye(dim, dtype=torch.float64)
    # The term lam_eff * w * ||M P^T||_F^2, M = R W - I: the identity probes
    # (w = 1, exact) for N >= D, else N standard normal rows with w = 1 / N.
    P, w = _probes_of_seed(123, u.shape[0], dim)
    lam_eff = lam * (1.0 if weight is None else weight)
    M = _inverse_error(layer)
    S = w * P.T @ P
    grad_w = 0.5 * (G.T @ u + c_w * R.T) + lam_eff * 2 * R.T @ M @ S
    grad_r = -0.5 * W.T @ (G.T @ z + c_w * eye) + lam_eff * 2 * M @ S @ W.T
    torch.testing.assert_close(layer.W.grad, grad_w)
    torch.testing.assert_close(layer.RT.grad, grad_r.T)  # R is stored as RT = R^T
    # The input and the bias get exact gradients.
    torch.testing.assert_close(x.grad.reshape(-1, dim), G @ W)
    expected_bias = G.sum(0) if exact == "forward" else -(G @ W).sum(0)
    torch.testing.assert_close(layer.bias.grad, expected_bias)


def test_reconstruction_gradient_is_autograd_of_the_term():
    """The term's part of the gradient (identity probes) is autograd's of lambda ||R W - I||_F^2."""
    dim, lam = 5, 0.4
    layer = _layer(dim, "inverse", reconstruction_weight=lam)
    x = torch.randn(8, dim, dtype=torch.float64)
    layer.inv(x).sum().backward()
    with_term = _grads(layer)
    _zero_grads(layer)
    out = layer.inv(x)
    (out.sum() + 0 * layer.penalty()).backward()  # weight 0: the data part alone
    data_only = _grads(layer)

    W = layer.W.detach().clone().requires_grad_()
    R = layer.R.detach().clone().requires_grad_()
    (lam * (R @ W - torch.eye(dim, dtype=torch.float64)).square().sum()).backward()
    torch.testing.assert_close(with_term["W"] - data_only["W"], W.grad)
    torch.testing.assert_close(with_term["RT"] - data_only["RT"], R.grad.T)
    torch.testing.assert_close(with_term["bias"], data_only["bias"])  # the term has no bias


def test_random_probes_are_unbiased():
    """For D > N the term's estimate averages to lambda ||R W - I||_F^2."""
    dim, lam = 6, 0.5
    layer = _layer(dim, "forward", reconstruction_weight=lam)
    exact = layer.penalty().detach()  # no training forward yet: computed exactly
    torch.testing.assert_close(exact, lam * _inverse_error(layer).square().sum())
    torch.manual_seed(0)
    estimates = []
    for _ in range(400):
        layer(torch.randn(2, dim, dtype=torch.float64))
        estimates.append(layer.penalty().detach())
    estimates = torch.stack(estimates)
    assert estimates.std() > 0.05 * exact  # random probes, not the exact term
    assert (estimates.mean() - exact).abs() < 4 * estimates.std() / 20


@pytest.mark.parametrize("exact", DIRECTIONS)
def test_surrogate_is_half_the_exact_gradients_when_r_inverts_w(exact):
    """With R = W^-1 the surrogate is the gradient of (L_W + L_{R^-1}) / 2, computed exactly."""
    dim, c = 5, -1.7
    layer = _layer(dim, exact, sync=True)
    x = torch.randn(11, dim, dtype=torch.float64)
    upstream = torch.randn(11, dim, dtype=torch.float64)

    def outer(out, log_det_w):  # any loss of the layer's output and log|det W|
        return (upstream * out).sum() + (out**2).sum() + c * log_det_w

    out, u = _exact_side(layer, x)
    sign = 1 if exact == "forward" else -1
    outer(out, sign * layer.log_abs_det()).backward()
    snf = _grads(layer)

    # L_W: the same loss through W with exact gradients (eval mode).
    _zero_grads(layer)
    layer.eval()
    out, _ = _exact_side(layer, x)
    outer(out, sign * layer.log_abs_det()).backward()
    exact_w = layer.W.grad
    # L_{R^-1}: the map R^-1 in W's place, differentiated through solve and slogdet.
    R = layer.R.detach().clone().requires_grad_()
    bias = layer.bias.detach()
    z = torch.linalg.solve(R, u.detach().T).T
    out = z + bias if exact == "forward" else z
    outer(out, -torch.linalg.slogdet(R)[1]).backward()

    torch.testing.assert_close(snf["W"], 0.5 * exact_w)
    torch.testing.assert_close(snf["RT"], 0.5 * R.grad.T)
    torch.testing.assert_close(snf["bias"], layer.bias.grad)  # the bias: exact


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("scale", [1.0, 0.3, 0.1])
def test_stability_needs_only_lambda_above_an_eighth(lam, scale):
    """The documented condition: the SNF optimum is stable iff lambda > 1/8, for data of any scale.

    One dimension, data of variance s^2, no bias, no penalty in the loss (the
    layer applies its term itself): the expected gradient field (W, R) ->
    (dL/dW, dL/dR) vanishes at W = 1/s, R = s, and its Jacobian there has
    determinant 4 lambda - 1/2 (the old data-based term's was 4 lambda s^2 -
    1/2, unstable for lambda = 1 at s = 0.3 and 0.1) and a positive trace:
    a stable node above the threshold, a saddle below it.
    """
    stable = lam > 1 / 8
    x = scale * torch.tensor([[-1.0], [1.0]], dtype=torch.float64)  # mean 0, variance s^2
    layer = self_normalizing_linear(1, bias=False, reconstruction_weight=lam).double()
    flow = dist.TransformedDistribution(_standard_normal(1), [layer])

    def field(w, r, penalty=False):
        with torch.no_grad():
            layer.W.fill_(w)
            layer.RT.fill_(r)
        _zero_grads(layer)
        loss = -flow.log_prob(x).mean()
        (loss + layer.penalty() if penalty else loss).backward()
        return torch.stack([layer.W.grad.squeeze(), layer.RT.grad.squeeze()])

    w0, r0, h = 1 / scale, scale, 1e-6
    torch.testing.assert_close(field(w0, r0), torch.zeros(2, dtype=torch.float64))
    off = field(1.1 * w0, 0.8 * r0)
    torch.testing.assert_close(off, field(1.1 * w0, 0.8 * r0, penalty=True))  # the same term
    jac = torch.stack(
        [(field(w0 + h, r0) - field(w0 - h, r0)) / (2 * h),
         (field(w0, r0 + h) - field(w0, r0 - h)) / (2 * h)], dim=1,
    )  # fmt: skip
    expected = torch.tensor(
        [[scale**2 / 2 + 2 * lam * scale**2, 2 * lam - 0.5], [2 * lam - 1, 2 * lam / scale**2]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(jac, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.linalg.det(jac), torch.tensor(4 * lam - 0.5).double())
    eigenvalues = torch.linalg.eigvals(jac).real
    assert (eigenvalues > 0).all() == stable


@pytest.mark.parametrize("lam", [1.0, 0.1])
def test_small_variance_data_trains_to_the_optimum_with_the_default_weight(lam):
    """Data of variance 0.01 (the old term's lambda s^2 = 0.01 < 1/8: a saddle) with no penalty
    in the loss: lambda = 1 converges to W = 1/s, R = s; lambda = 0.1 < 1/8 does not."""
    s = 0.1
    layer = self_normalizing_linear(
        1, bias=False, reconstruction_weight=lam, init=torch.tensor([[1.2 / s]])
    ).double()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = s * torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    for _ in range(500 if lam > 1 / 8 else 200):
        opt.zero_grad()
        z = layer.inv(x)  # role="density": log p(x) = log N(z) - log_abs_det()
        (0.5 * z.square().sum(-1).mean() + layer.log_abs_det()).backward()
        opt.step()
    w, r = (layer.W * s).item(), (layer.R / s).item()
    if lam > 1 / 8:
        assert abs(w - 1) < 0.01 and abs(r - 1) < 0.01
    else:
        assert abs(w * r - 1) > 0.3  # R is no inverse of W


def test_eval_mode_and_no_grad_are_plain_exact_maps():
    layer = _layer(4, "forward", sync=True)
    layer.eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    layer(x).sum().backward()
    assert layer.RT.grad is None  # R plays no part in the exact map
    with torch.no_grad():
        layer.train()
        torch.testing.assert_close(layer(x), x @ layer.W.T + layer.bias)


# ------------------------------------------------------------- the penalty
@pytest.mark.parametrize("exact", DIRECTIONS)
@pytest.mark.parametrize("rows", [14, 3], ids=["identity probes", "random probes"])
def test_penalty_is_the_forwards_estimate_of_the_inverse_error(exact, rows):
    """Before a forward: exactly lambda ||R W - I||_F^2; after one: that forward's estimate."""
    dim, lam = 5, 0.3
    layer = _layer(dim, exact, reconstruction_weight=lam)
    exact_term = lam * _inverse_error(layer).square().sum()
    torch.testing.assert_close(layer.penalty().detach(), exact_term)  # before any forward
    x = torch.randn(rows, dim, dtype=torch.float64)
    torch.manual_seed(7)
    _exact_side(layer, x)
    P, w = _probes_of_seed(7, rows, dim)

    W = layer.W.detach().clone().requires_grad_()
    R = layer.R.detach().clone().requires_grad_()
    eye = torch.eye(dim, dtype=torch.float64)
    expected = lam * w * ((R @ W - eye) @ P.T).square().sum()
    expected.backward()

    penalty = pyro_lunet.penalty(layer)
    torch.testing.assert_close(penalty, expected.detach())
    if rows < dim:
        assert not torch.allclose(penalty, exact_term)  # an estimate, not the exact term
    penalty.backward()  # the term alone, weight 1
    torch.testing.assert_close(layer.W.grad, W.grad)
    torch.testing.assert_close(layer.RT.grad, R.grad.T)
    assert layer.bias.grad is None  # the term does not depend on the bias


def test_penalty_sets_the_weight_and_is_fresh_after_a_backward_or_a_step():
    dim, lam = 4, 0.8
    layer = _layer(dim, "inverse", reconstruction_weight=lam)
    flow = dist.TransformedDistribution(_standard_normal(dim), [layer])
    data = torch.randn(16, dim, dtype=torch.float64)

    def grads_with(weights):
        """Gradients of nll + sum(c * penalty() for c in weights), one backward pass."""
        _zero_grads(layer)
        loss = -flow.log_prob(data).mean()
        for c in weights:
            loss = loss + c * layer.penalty()
        loss.backward()
        return _grads(layer)

    builtin, data_only = grads_with([]), grads_with([0.0])
    W = layer.W.detach().clone().requires_grad_()
    R = layer.R.detach().clone().requires_grad_()
    (lam * (R @ W - torch.eye(dim, dtype=torch.float64)).square().sum()).backward()
    term = {"W": W.grad, "RT": R.grad.T, "bias": torch.zeros(dim, dtype=torch.float64)}
    for name in builtin:  # no penalty: weight lambda, applied by the layer
        torch.testing.assert_close(builtin[name] - data_only[name], term[name])
    for weights, total in [([1.0], 1.0), ([2.0], 2.0), ([1.0, 1.0], 2.0), ([0.5, 2.5], 3.0)]:
        got = grads_with(weights)  # c * penalty(): weight c * lambda, the built-in one skipped
        for name in got:
            torch.testing.assert_close(got[name], data_only[name] + total * term[name])

    # A second backward pass (the first freed its graph): penalty() is computed
    # afresh, and its gradient adds to the one the layer applied in the first.
    _zero_grads(layer)
    (-flow.log_prob(data).mean()).backward()
    fresh = layer.penalty()
    torch.testing.assert_close(fresh.detach(), lam * _inverse_error(layer).square().sum())
    fresh.backward()
    for name, g in _grads(layer).items():
        torch.testing.assert_close(g, data_only[name] + 2 * term[name])

    # After an optimizer step with no forward since: exact at the new W and R.
    flow.log_prob(data)  # a record, made stale by the step
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    with torch.no_grad():
        expected = lam * _inverse_error(layer).square().sum()
        torch.testing.assert_close(layer.penalty(), expected)
        assert not layer.penalty().requires_grad
    _zero_grads(layer)
    layer.penalty().backward()  # a fresh graph
    assert layer.W.grad is not None and layer.RT.grad is not None


def test_only_training_forwards_with_grad_are_recorded():
    dim = 3
    layer = _layer(dim, "inverse")
    flow = dist.TransformedDistribution(_standard_normal(dim), [layer])
    flow.log_prob(torch.randn(2, dim, dtype=torch.float64))  # N < D: a random estimate
    recorded = layer.penalty()
    assert not torch.allclose(recorded, _inverse_error(layer).square().sum())
    with torch.no_grad():
        flow.log_prob(torch.randn(8, dim, dtype=torch.float64) * 10)
    layer.eval()
    flow.log_prob(torch.randn(8, dim, dtype=torch.float64) * 10)
    layer.train()
    flow.sample((5,))  # the fast side: no term
    assert layer.penalty() is recorded
    unweighted = self_normalizing_linear(3, reconstruction_weight=0.0)
    assert unweighted.penalty().item() == 0.0
    dist.TransformedDistribution(_standard_normal(3, torch.float32), [unweighted]).log_prob(
        torch.randn(8, 3)
    )
    assert unweighted.penalty().item() == 0.0


def test_penalty_sums_over_a_module_tree():
    torch.manual_seed(0)
    flow = pyro.distributions.transforms.ComposeTransformModule(
        [self_normalizing_linear(3), leaky_softplus(0.3, inverse=True), self_normalizing_linear(3)]
    )
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), flow)
    model.log_prob(torch.randn(10, 3) * 2)
    first, last = flow[0], flow[2]
    torch.testing.assert_close(pyro_lunet.penalty(flow), first.penalty() + last.penalty())
    assert first.penalty() > 0 and last.penalty() > 0


def test_training_without_the_penalty_is_silent_and_the_same():
    """No penalty in the loss: no warning, and the same steps as with ``penalty()`` added."""
    dim = 3
    data = torch.randn(8, dim, dtype=torch.float64)
    trained = []
    for with_penalty in (False, True):
        layer = _layer(dim, "inverse")
        flow = dist.TransformedDistribution(_standard_normal(dim), [layer])
        opt = torch.optim.Adam(layer.parameters(), lr=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(10):
                opt.zero_grad()
                loss = -flow.log_prob(data).mean()
                (loss + pyro_lunet.penalty(layer) if with_penalty else loss).backward()
                opt.step()
        trained.append(layer.state_dict())
    for name, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][name], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------- log-det values
@pytest.mark.parametrize("exact", DIRECTIONS)
def test_eval_log_det_is_slogdet_and_never_stale(exact):
    layer = _layer(6, exact)
    flow = dist.TransformedDistribution(_standard_normal(6), [layer])
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    data = torch.randn(32, 6, dtype=torch.float64)
    sign = 1 if exact == "forward" else -1
    for _ in range(3):
        opt.zero_grad()
        (-flow.log_prob(data).mean() + pyro_lunet.penalty(layer)).backward()
        opt.step()
        layer.eval()
        with torch.no_grad():
            expected = sign * torch.linalg.slogdet(layer.W)[1]
            first = layer.log_abs_det()
            assert layer.log_abs_det() is first  # memoized while W is unchanged
        torch.testing.assert_close(first, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.log_abs_det(), expected, rtol=1e-12, atol=1e-12)
        weight = layer.weight()
        torch.testing.assert_close(torch.linalg.slogdet(weight)[1], expected)
        layer.train()


def _train_density(layer, steps, lr=1e-2, seed=0, each=None, decay=1.0, penalty=False):
    """Fits ``layer`` (role="density") to correlated Gaussian data; returns the mixing matrix.

    With ``penalty`` the loss adds ``pyro_lunet.penalty(layer)`` (weight 1:
    the same gradients as without, where the layer applies its term itself).
    """
    torch.manual_seed(seed)
    dim = layer.input_dim
    mix = 0.3 * torch.randn(dim, dim, dtype=torch.float64) / math.sqrt(dim) + torch.eye(dim)
    flow = dist.TransformedDistribution(_standard_normal(dim), [layer])
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, decay)
    for _ in range(steps):
        data = torch.randn(128, dim, dtype=torch.float64) @ mix.T + 1.0
        opt.zero_grad()
        loss = -flow.log_prob(data).mean()
        if penalty:
            loss = loss + pyro_lunet.penalty(layer)
        loss.backward()
        opt.step()
        schedule.step()
        if each is not None:
            each()
    return mix


def test_training_log_det_is_tracked_closely_and_re_anchored():
    """The tracking error per update is of order ||R W - I|| ||dW||: checked where R follows W^-1
    closely. (Under Adam, R lags W^-1 in the first steps by an amount that falls with lambda:
    ||R W - I||_F up to 0.5 here with lambda = 1, 0.12 with lambda = 10; hence lambda = 10,
    and the bias starting at 0 rather than far from the data's mean.)"""
    layer = _layer(8, "inverse", scale=0.05, sync=True, anchor_every=1000, reconstruction_weight=10)
    with torch.no_grad():
        layer.bias.zero_()
    history = []

    def check():
        with torch.no_grad():
            history.append((-layer.log_abs_det(), torch.linalg.slogdet(layer.W)[1]))

    check()
    _train_density(layer, 150, each=check, penalty=True)
    tracked, exact = (torch.stack(h) for h in zip(*history))
    # Each update follows the exact change closely (R stands in for W^-1)...
    step_error = (tracked.diff() - exact.diff()).abs()
    assert (step_error <= 0.15 * exact.diff().abs() + 2e-3).all()
    # ... and the drift stays small over the run, never re-anchored.
    drift = (tracked - exact).abs()
    assert drift.max() < 0.1 and drift[-1] > 0
    layer.anchor_every = 5
    for _ in range(5):
        check()
    torch.testing.assert_close(history[-1][0], history[-1][1], rtol=0, atol=1e-12)


def test_tracking_follows_updates_through_data():
    """Pyro's ClippedAdam writes through ``.data``, which leaves tensor versions alone."""
    layer = _layer(5, "forward", sync=True)
    layer.log_abs_det()
    step = 1e-3 * torch.randn(5, 5, dtype=torch.float64)
    layer.W.data.add_(step)
    layer.RT.data.copy_(torch.linalg.inv(layer.W.data).T)
    with torch.no_grad():
        torch.testing.assert_close(
            layer.log_abs_det(), torch.linalg.slogdet(layer.W)[1], rtol=0, atol=1e-8
        )


def test_tracking_keeps_the_rsample_log_prob_cache():
    """log_abs_det() updates buffers; a cached rsample -> log_prob pair must survive it."""
    dim = 4
    layer = _layer(dim, "forward")  # R != W^-1: a cache miss would show in log_prob
    layer.approximate = True
    calls = []
    fast_side = layer._fast_side
    layer._fast_side = lambda v: calls.append(1) or fast_side(v)
    flow = dist.TransformedDistribution(_standard_normal(dim), [layer])
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        y = flow.rsample((7,))
        log_q = flow.log_prob(y)
        assert calls == []  # answered by the cache, not by R
        eps = layer._cached_x_y[0]
        expected = _standard_normal(dim).log_prob(eps) - layer.log_abs_det()
        torch.testing.assert_close(log_q, expected)
        (log_q.mean() + pyro_lunet.penalty(layer)).backward()
        opt.step()


# ------------------------------------------------------------------- the map
def test_directions_weights_and_bias_placement():
    dim = 5
    x = torch.randn(7, dim, dtype=torch.float64)
    fwd = _layer(dim, "forward", sync=True)
    torch.testing.assert_close(fwd.weight(), fwd.W.detach())
    torch.testing.assert_close(fwd(x), x @ fwd.W.T + fwd.bias)
    torch.testing.assert_close(fwd.inv(x), (x - fwd.bias) @ fwd.R.T)

    inv = _layer(dim, "inverse", sync=True)
    torch.testing.assert_close(inv.weight(), torch.linalg.inv(inv.W.detach()))
    torch.testing.assert_close(inv.inv(x), (x - inv.bias) @ inv.W.T)
    torch.testing.assert_close(inv(x), x @ inv.R.T + inv.bias)
    torch.testing.assert_close(inv.log_abs_det(), -torch.linalg.slogdet(inv.W)[1])


@pytest.mark.parametrize("exact", DIRECTIONS)
def test_approximate_toggle_and_exact_solve(exact):
    layer = _layer(6, exact)  # R != W^-1
    fast = layer if exact == "inverse" else layer.inv
    x = torch.randn(5, 6, dtype=torch.float64)
    approx = fast(x)
    layer.approximate = False
    exact_value = fast(x)  # the same tensor: the cache must not answer
    assert not torch.allclose(approx, exact_value)
    with torch.no_grad():
        memoized = fast(x.clone())
    torch.testing.assert_close(memoized, exact_value)
    back = layer.inv(exact_value) if exact == "inverse" else layer(exact_value)
    torch.testing.assert_close(back, x)


def test_init_options_and_bad_arguments():
    torch.manual_seed(0)
    for init in ("identity", "orthogonal", torch.randn(4, 4) + 4 * torch.eye(4)):
        layer = self_normalizing_linear(4, init=init)
        torch.testing.assert_close(layer.R @ layer.W, torch.eye(4), atol=1e-6, rtol=0)
        assert layer.W.is_contiguous() and layer.RT.is_contiguous()  # Pyro's param store
    identity = self_normalizing_linear(64)
    assert (identity.W - torch.eye(64)).abs().max() < 0.01
    with pytest.raises(ValueError, match="exact"):
        self_normalizing_linear(3, exact="sideways")
    with pytest.raises(ValueError, match="role"):
        self_normalizing_linear(3, role="sideways")
    with pytest.raises(ValueError, match="reconstruction_weight"):
        self_normalizing_linear(3, reconstruction_weight=-1.0)
    with pytest.raises(ValueError, match="anchor_every"):
        self_normalizing_linear(3, anchor_every=0)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        self_normalizing_linear(3, init=torch.eye(4))
    with pytest.raises(ValueError, match="singular"):
        self_normalizing_linear(2, init=torch.ones(2, 2))
    with pytest.raises(ValueError, match="init"):
        self_normalizing_linear(3, init="zeros")


def test_copies_keep_the_tracked_state_and_drop_the_record():
    layer = _layer(4, "inverse")
    flow = dist.TransformedDistribution(_standard_normal(4), [layer])
    data = torch.randn(8, 4, dtype=torch.float64)
    (-flow.log_prob(data).mean()).backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    flow.log_prob(data[:2])  # N < D: the record is a random estimate
    recorded = layer.penalty()
    exact_term = _inverse_error(layer).square().sum()
    assert not torch.allclose(recorded, exact_term)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(clone.penalty(), exact_term)  # the record is not copied
        torch.testing.assert_close(clone.log_abs_det(), layer.log_abs_det())
    assert layer.penalty() is recorded
    view = layer.with_cache(0)  # shares the parameters and the record
    assert layer._tracker is view._tracker
    flow0 = dist.TransformedDistribution(_standard_normal(4), [view])
    flow0.log_prob(torch.randn(8, 4, dtype=torch.float64))
    assert layer.penalty() is view.penalty() and layer.penalty() is not recorded


def test_docstring_example_runs():
    result = doctest.testmod(snf_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------- the fits
def test_trained_layer_reconstructs_below_1e_3():
    """No penalty in the loss: R ends an inverse of W to 1e-3, on white probes and on the data."""
    layer = _layer(8, "inverse", scale=0.0, sync=True)
    with torch.no_grad():
        layer.bias.zero_()  # a fit that converges in 600 steps: the data's mean is 1
    mix = _train_density(layer, 600, decay=0.995)
    with torch.no_grad():
        assert (layer.bias - 1).abs().max() < 0.1  # trained
        assert _inverse_error(layer).square().sum() < 1e-3  # the term's ||R W - I||_F^2
        torch.manual_seed(1)
        data = torch.randn(4096, 8, dtype=torch.float64) @ mix.T + 1.0
        u = data - layer.bias
        error = ((u @ layer.W.T) @ layer.R.T - u).square().sum(-1).mean()
    assert error < 1e-3


@pytest.mark.slow
def test_density_model_fits_and_samples():
    """Two SNF layers and a leaky softplus (role="density"): exact scoring, fast sampling."""
    torch.manual_seed(0)
    dim = 4
    # Data from a known non-Gaussian flow: its entropy is the best NLL reachable.
    truth = [
        self_normalizing_linear(dim, init=torch.randn(dim, dim) + 2 * torch.eye(dim)),
        leaky_softplus(0.3, inverse=True),
        self_normalizing_linear(dim, init=torch.randn(dim, dim) + 2 * torch.eye(dim)),
    ]
    for t in truth:
        t.eval()
    truth_dist = dist.TransformedDistribution(dist.Normal(torch.zeros(dim), 1.0).to_event(1), truth)
    with torch.no_grad():
        train, test = truth_dist.sample((20000,)), truth_dist.sample((5000,))
        entropy = -truth_dist.log_prob(test).mean()

    def fit(snf: bool) -> tuple[float, torch.nn.Module]:
        torch.manual_seed(1)
        # The data's covariance has eigenvalues down to 0.06. Any lambda > 1/8 is
        # stable (test_stability_needs_only_lambda_above_an_eighth); lambda = 10
        # keeps R closer to W^-1 early on, and penalty() in the loss keeps it 10.
        flow = pyro_lunet.activation_flow(
            dim, 1, "self_normalizing", role="density", alpha=0.3,
            layer_kwargs={"reconstruction_weight": 10.0},
        )  # fmt: skip
        if not snf:
            flow.eval()  # exact gradients
        model = dist.TransformedDistribution(dist.Normal(torch.zeros(dim), 1.0).to_event(1), flow)
        opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
        for _ in range(1000):
            batch = train[torch.randint(0, len(train), (256,))]
            opt.zero_grad()
            (-model.log_prob(batch).mean() + pyro_lunet.penalty(flow)).backward()
            opt.step()
        flow.eval()
        with torch.no_grad():
            return -model.log_prob(test).mean().item(), model

    nll_snf, model = fit(snf=True)
    nll_exact, _ = fit(snf=False)
    assert nll_snf < entropy + 0.1
    assert abs(nll_snf - nll_exact) < 0.02
    flow = model.transforms[0]
    with torch.no_grad():  # the fast side (R) samples the fitted density
        eps = torch.randn(20000, dim)
        fast = flow(eps)
        for layer in (flow[0], flow[2]):
            layer.approximate = False
        exact = flow(eps)
    assert ((fast - exact).norm(dim=-1) / exact.norm(dim=-1)).median() < 0.01
    torch.testing.assert_close(fast.mean(0), test.mean(0), atol=0.15, rtol=0.05)
    torch.testing.assert_close(torch.cov(fast.T), torch.cov(test.T), atol=0.25, rtol=0.2)


def _svi_loss(elbo):
    def loss(model, guide, *args, **kwargs):
        return elbo.differentiable_loss(model, guide, *args, **kwargs) + pyro_lunet.penalty(guide)

    return loss


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["wrapped", "PenalizedELBO"])
def test_guide_fits_correlated_gaussian_with_svi(loss):
    """role="guide" in AutoNormalizingFlow, trained by SVI with the penalty in the loss."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    loc, cov, model = correlated_gaussian()

    guide = AutoNormalizingFlow(model, partial(self_normalizing_linear, role="guide"))
    # ClippedAdam writes through .data: the log-det tracking must not rely on versions.
    optimizer = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.997})
    elbo = Trace_ELBO(num_particles=32, vectorize_particles=True)
    if loss == "wrapped":
        svi = SVI(model, guide, optimizer, _svi_loss(elbo))
    else:
        svi = SVI(model, guide, optimizer, pyro_lunet.PenalizedELBO(elbo, optimizer))
    for _ in range(800):
        svi.step()
    layer = guide.transform
    with torch.no_grad():
        z = guide.get_posterior().sample((20000,))
        torch.testing.assert_close(z.mean(0), loc, atol=0.15, rtol=0)
        torch.testing.assert_close(torch.cov(z.T), cov, atol=0.15, rtol=0)
        # The fast side (R) scores external points almost as the exact solve does.
        points = torch.randn(100, 4) + loc
        approx = guide.get_posterior().log_prob(points)
        layer.approximate = False
        exact = guide.get_posterior().log_prob(points)
        torch.testing.assert_close(approx, exact, atol=0.05, rtol=0.03)
        # The training-mode log-det followed ClippedAdam's updates.
        tracked = layer.log_abs_det()
        layer.eval()
        torch.testing.assert_close(tracked, layer.log_abs_det(), atol=0.02, rtol=0)


def test_at_least_32_probes_by_default(monkeypatch):
    monkeypatch.undo()  # the layer's own minimum
    W = torch.eye(40, dtype=torch.float64)
    assert snf_module._probes(1, W[:8, :8]) == (None, 1.0)  # D <= 32: exact
    assert snf_module._probes(8, W[:32, :32]) == (None, 1.0)
    probes, weight = snf_module._probes(1, W)  # D = 40 > max(1, 32)
    assert probes.shape == (32, 40) and weight == 1 / 32
    probes, weight = snf_module._probes(35, W)
    assert probes.shape == (35, 40) and weight == 1 / 35


def test_deprecated_exact_keyword_warns_and_maps_to_role():
    for exact, role in (("forward", "guide"), ("inverse", "density")):
        with pytest.warns(DeprecationWarning, match=f"use role='{role}'"):
            layer = self_normalizing_linear(3, exact=exact)
        assert layer.role == role
        with pytest.warns(DeprecationWarning, match="role"):
            assert layer.exact == exact
    with pytest.raises(ValueError, match="role= only"):
        self_normalizing_linear(3, role="guide", exact="forward")
    assert self_normalizing_linear(3).role == "density"  # the default


# ------------------------------------------------------------ inside a flow
def _snf_flow(dim, role, seed=0, **layer_kwargs):
    """A float64 ``activation_flow`` of SNF layers away from the identity, with R != W^-1."""
    torch.manual_seed(seed)
    flow = pyro_lunet.activation_flow(
        dim, 2, "self_normalizing", role=role, layer_kwargs=layer_kwargs
    ).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def _unfused_run(flow, x, inverse):
    """The flow's parts one at a time, each by its own path (no kernels): ``(out, log_det)``."""
    h, total = x, 0.0
    for part in flow.parts[::-1] if inverse else flow.parts:
        h, log_det = part._apply_with_log_det(h, inverse)
        total = total + (log_det.sum(-1) if log_det.dim() == h.dim() else log_det)
    return h, total


def _graph_nodes(tensor):
    """The names of the autograd nodes behind ``tensor``."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(parent for parent, _ in node.next_functions)
    return names


@pytest.mark.parametrize("role", ["guide", "density"])
@pytest.mark.parametrize("rows", [8, 3], ids=["identity probes", "random probes"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"bias": False, "reconstruction_weight": 0.4}, {"reconstruction_weight": 0.0}],
    ids=["default", "no bias, lambda 0.4", "lambda 0"],
)  # fmt: skip
@pytest.mark.parametrize("penalized", [False, True], ids=["built-in term", "2.5 penalty"])
def test_flow_runs_the_exact_sides_as_kernels_with_the_layers_values_and_gradients(
    role, rows, kwargs, penalized
):
    """In a flow's training run the exact sides join the flow's one autograd node: the same
    outputs, log-dets (the tracked values), penalty, parameter and input gradients (the
    surrogate ones) and tracking state as each layer's own path, in float64."""
    dim, inverse = 5, role == "density"
    flow = _snf_flow(dim, role, **kwargs)
    reference = copy.deepcopy(flow)
    x = torch.randn(rows, dim, dtype=torch.float64)
    weights = torch.randn(rows, dim, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    results = []
    for model, run in ((flow, flow._run), (reference, partial(_unfused_run, reference))):
        h = x.clone().requires_grad_()
        torch.manual_seed(7)  # the random probes
        out, log_det = run(h, inverse)
        term = pyro_lunet.penalty(model)
        loss = (out * weights[0]).sum() + (log_det * weights[1]).sum()
        if penalized:
            loss = loss + 2.5 * term
        nodes = _graph_nodes(loss)
        grads = torch.autograd.grad(loss, [h, *model.parameters()])
        buffers = [b.clone() for b in model.buffers()]
        results.append((out, log_det, term.detach(), grads, buffers, nodes))
    (out, log_det, term, grads, buffers, nodes), want = results[0], results[1]
    assert "_SelfNormalizingProductBackward" not in nodes  # the kernels ran
    assert "_SelfNormalizingProductBackward" in want[5] or kwargs.get("reconstruction_weight") == 0
    torch.testing.assert_close(out, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_det, want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(term, want[2], rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, want[3]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got, expected in zip(buffers, want[4]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert [p.grad for p in flow.parameters()] == [None] * len(list(flow.parameters()))


def test_flow_kernels_take_one_tracking_step_and_record_a_term_spent_by_backward():
    dim = 4
    flow = _snf_flow(dim, "guide")
    layers = [flow[0], flow[2], flow[4]]
    model = dist.TransformedDistribution(_standard_normal(dim), flow)
    z = model.rsample((6,))
    log_q = model.log_prob(z)  # the cached pair: no second run, no second tracking step
    assert [layer._tracker.steps for layer in layers] == [1, 1, 1]  # counted from the anchor
    records = [layer._tracker.record for layer in layers]
    assert all(r is not None and not r.spent[0] for r in records)
    assert all(layer.penalty() is r.term for layer, r in zip(layers, records))
    (log_q + 0.5 * z.square().sum(-1)).mean().backward()
    assert all(r.spent[0] for r in records)
    assert all(layer.penalty() is not r.term for layer, r in zip(layers, records))
    # The layers hold no graph of the run any more (its node keeps every step's rows).
    assert all(layer._tracker.record is None for layer in layers)


def test_flow_kernels_with_a_loss_of_the_penalty_only():
    """A backward that reaches the run only through the recorded terms (the other steps get
    no gradient) trains R and W as the layers' own paths do."""
    dim = 4
    flow = _snf_flow(dim, "guide", reconstruction_weight=0.6)
    reference = copy.deepcopy(flow)
    x = torch.randn(7, dim, dtype=torch.float64)
    flow._run(x, inverse=False)
    _unfused_run(reference, x, inverse=False)
    got = torch.autograd.grad(pyro_lunet.penalty(flow), list(flow.parameters()), allow_unused=True)
    want = torch.autograd.grad(
        pyro_lunet.penalty(reference), list(reference.parameters()), allow_unused=True
    )
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("role", ["guide", "density"])
def test_flow_kernels_gradients_with_a_graph_match_the_layers(role):
    """``create_graph=True`` re-runs the kernels by the layers' own autograd Functions: the
    same first-order gradients, now differentiable. (Second-order ones through the
    surrogate are not the same: the built-in term's gradient is applied once by every
    node a backward pass reaches, and the re-run is a second node; see
    ``SelfNormalizingLinear._kernel``.)"""
    dim, inverse = 4, role == "density"
    flow = _snf_flow(dim, role, seed=3)
    reference = copy.deepcopy(flow)
    x = torch.randn(3, dim, dtype=torch.float64)
    results = []
    for model, run in ((flow, flow._run), (reference, partial(_unfused_run, reference))):
        h = x.clone().requires_grad_()
        torch.manual_seed(1)
        out, log_det = run(h, inverse)
        loss = out.square().sum() + log_det.sum()
        grads = torch.autograd.grad(loss, [h, *model.parameters()], create_graph=True)
        assert all(g.requires_grad for g in grads)
        results.append(grads)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_flow_kernels_only_for_training_with_grad_and_trainable_layers():
    dim = 4
    flow = _snf_flow(dim, "guide")
    layer = flow[0]
    assert layer._kernel(inverse=False) is not None
    assert layer._kernel(inverse=True) is None  # the fast side: R, a plain product
    with torch.no_grad():
        assert layer._kernel(inverse=False) is None
    layer.eval()
    assert layer._kernel(inverse=False) is None
    layer.train()
    layer.W.requires_grad_(False)
    assert layer._kernel(inverse=False) is None
