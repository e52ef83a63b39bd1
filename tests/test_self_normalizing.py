"""Self-normalizing layers (SNF): surrogate gradients, penalty, log-det tracking, fits."""

from __future__ import annotations

import copy
import doctest
import math
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

DIRECTIONS = ["forward", "inverse"]


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: one intra-op thread is fastest, and robust to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(dim, exact="inverse", seed=0, scale=0.3, sync=False, **kwargs):
    """A float64 layer with W away from the identity and R != W^-1 (unless ``sync``)."""
    torch.manual_seed(seed)
    layer = self_normalizing_linear(dim, exact=exact, **kwargs).double()
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
    if layer.exact == "forward":
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
@pytest.mark.parametrize("exact", DIRECTIONS)
@pytest.mark.parametrize("batch", [(9,), (3, 4)], ids=str)
def test_surrogate_gradients_match_the_formulas(exact, batch):
    dim, lam, c = 6, 0.7, 2.5
    layer = _layer(dim, exact, reconstruction_weight=lam)
    W, R = layer.W.detach(), layer.R.detach()
    x = torch.randn(*batch, dim, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*batch, dim, dtype=torch.float64)
    out, _ = _exact_side(layer, x)
    loss = (upstream * out).sum() + c * layer.log_abs_det() + pyro_lunet.penalty(layer)
    loss.backward()

    # The formulas, on rows: z = u W^T, G = dL/dz, c_W = dL/dlog|det W|.
    u = (x.detach() if exact == "forward" else x.detach() - layer.bias.detach()).reshape(-1, dim)
    G = upstream.reshape(-1, dim)
    c_w = c if exact == "forward" else -c
    n = u.shape[0]
    z = u @ W.T
    E = z @ R.T - u
    eye = torch.eye(dim, dtype=torch.float64)
    grad_w = 0.5 * (G.T @ u + c_w * R.T) + lam * (2 / n) * R.T @ E.T @ u
    grad_r = -0.5 * W.T @ (G.T @ z + c_w * eye) + lam * (2 / n) * E.T @ z
    torch.testing.assert_close(layer.W.grad, grad_w)
    torch.testing.assert_close(layer.RT.grad, grad_r.T)  # R is stored as RT = R^T
    # The input and the bias get exact gradients.
    torch.testing.assert_close(x.grad.reshape(-1, dim), G @ W)
    expected_bias = G.sum(0) if exact == "forward" else -(G @ W).sum(0)
    torch.testing.assert_close(layer.bias.grad, expected_bias)


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
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_stability_needs_lambda_times_variance(lam, scale):
    """The documented condition: the SNF optimum is stable iff lambda * var(u) > 1/8.

    One dimension, data of variance s^2, no bias: the expected gradient field
    (W, R) -> (dL/dW, dL/dR) of nll + penalty vanishes at W = 1/s, R = s, and
    its Jacobian there has determinant 4 lambda s^2 - 1/2 and a positive
    trace: a stable node above the threshold, a saddle below it.
    """
    s2 = scale**2
    stable = lam * s2 > 1 / 8  # unstable: (0.1, 1.0), (0.1, 0.3), (1.0, 0.3)
    x = scale * torch.tensor([[-1.0], [1.0]], dtype=torch.float64)  # mean 0, variance s^2
    layer = self_normalizing_linear(1, bias=False, reconstruction_weight=lam).double()
    flow = dist.TransformedDistribution(_standard_normal(1), [layer])

    def field(w, r):
        with torch.no_grad():
            layer.W.fill_(w)
            layer.RT.fill_(r)
        _zero_grads(layer)
        (-flow.log_prob(x).mean() + layer.penalty()).backward()
        return torch.stack([layer.W.grad.squeeze(), layer.RT.grad.squeeze()])

    w0, r0, h = 1 / scale, scale, 1e-6
    torch.testing.assert_close(field(w0, r0), torch.zeros(2, dtype=torch.float64))
    jac = torch.stack(
        [(field(w0 + h, r0) - field(w0 - h, r0)) / (2 * h),
         (field(w0, r0 + h) - field(w0, r0 - h)) / (2 * h)], dim=1,
    )  # fmt: skip
    torch.testing.assert_close(torch.linalg.det(jac), torch.tensor(4 * lam * s2 - 0.5).double())
    eigenvalues = torch.linalg.eigvals(jac).real
    assert (eigenvalues > 0).all() == stable


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
def test_penalty_is_the_reconstruction_error_of_the_last_input(exact):
    dim, lam = 5, 0.3
    layer = _layer(dim, exact, reconstruction_weight=lam)
    assert layer.penalty().item() == 0.0  # before any training forward
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    _, u = _exact_side(layer, x)
    u = u.reshape(-1, dim).detach()

    W = layer.W.detach().clone().requires_grad_()
    R = layer.R.detach().clone().requires_grad_()
    expected = lam * ((u @ W.T) @ R.T - u).square().sum(-1).mean()
    expected.backward()

    penalty = pyro_lunet.penalty(layer)
    torch.testing.assert_close(penalty, expected.detach())
    penalty.backward()
    torch.testing.assert_close(layer.W.grad, W.grad)
    torch.testing.assert_close(layer.RT.grad, R.grad.T)
    assert layer.bias.grad is None  # u is held constant: no gradient to the bias


def test_penalty_reads_twice_after_backward_and_after_a_step():
    dim = 4
    layer = _layer(dim, "inverse")
    flow = dist.TransformedDistribution(_standard_normal(dim), [layer])
    data = torch.randn(16, dim, dtype=torch.float64)

    # Fused: one backward through nll + penalty.
    (-flow.log_prob(data).mean() + pyro_lunet.penalty(layer)).backward()
    fused = _grads(layer)

    # Read twice in one loss: the term counts twice.
    _zero_grads(layer)
    nll = -flow.log_prob(data).mean()
    (nll + layer.penalty() + layer.penalty()).backward()
    _zero_grads(layer)
    (-flow.log_prob(data).mean()).backward()
    nll_only = _grads(layer)
    _zero_grads(layer)
    nll = -flow.log_prob(data).mean()
    (nll + 2 * layer.penalty()).backward()
    twice = _grads(layer)
    for name in fused:
        torch.testing.assert_close(twice[name] - nll_only[name], 2 * (fused[name] - nll_only[name]))

    # Two backward passes (the graph of the first is freed): recomputed, same gradients.
    _zero_grads(layer)
    (-flow.log_prob(data).mean()).backward()
    layer.penalty().backward()
    for name, g in _grads(layer).items():
        torch.testing.assert_close(g, fused[name])

    # After an optimizer step with no forward since: the term for the last
    # input (taken before the step moved the bias) at the new W and R.
    u = (data - layer.bias).detach()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    with torch.no_grad():
        expected = ((u @ layer.W.T) @ layer.R.T - u).square().sum(-1).mean()
        torch.testing.assert_close(layer.penalty(), expected)
    assert not layer.penalty().detach().requires_grad
    _zero_grads(layer)
    layer.penalty().backward()  # a fresh graph
    assert layer.W.grad is not None and layer.RT.grad is not None


def test_only_training_forwards_with_grad_are_recorded():
    layer = _layer(3, "inverse")
    flow = dist.TransformedDistribution(_standard_normal(3), [layer])
    data = torch.randn(8, 3, dtype=torch.float64)
    flow.log_prob(data)
    recorded = layer.penalty().detach()
    with torch.no_grad():
        flow.log_prob(torch.randn(8, 3, dtype=torch.float64) * 10)
    layer.eval()
    flow.log_prob(torch.randn(8, 3, dtype=torch.float64) * 10)
    layer.train()
    flow.sample((5,))  # the fast side: nothing to reconstruct
    torch.testing.assert_close(layer.penalty().detach(), recorded)
    assert self_normalizing_linear(3, reconstruction_weight=0.0).penalty().item() == 0.0


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


def test_training_without_the_penalty_warns():
    layer = _layer(3, "inverse")
    flow = dist.TransformedDistribution(_standard_normal(3), [layer])
    data = torch.randn(8, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # in the loss
            (-flow.log_prob(data).mean() + pyro_lunet.penalty(layer)).backward()
        for _ in range(2):  # in a second backward pass, as PenalizedELBO does
            (-flow.log_prob(data).mean()).backward()
            layer.penalty().backward()
        for _ in range(snf_module._WARN_AFTER):  # forgotten...
            (-flow.log_prob(data).mean()).backward()
    with pytest.warns(UserWarning, match="penalty"):
        flow.log_prob(data)  # ... noticed after a few steps


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


def _train_density(layer, steps, lr=1e-2, seed=0, each=None, decay=1.0):
    """Fits ``layer`` (exact="inverse") to correlated Gaussian data; returns the mixing matrix.

    The data's covariance is well conditioned: SNF's reconstruction term
    scales with the input's variance (see the class docstring).
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
        loss = -flow.log_prob(data).mean() + pyro_lunet.penalty(layer)
        loss.backward()
        opt.step()
        schedule.step()
        if each is not None:
            each()
    return mix


def test_training_log_det_is_tracked_closely_and_re_anchored():
    layer = _layer(8, "inverse", scale=0.05, sync=True, anchor_every=1000)
    history = []

    def check():
        with torch.no_grad():
            history.append((-layer.log_abs_det(), torch.linalg.slogdet(layer.W)[1]))

    check()
    _train_density(layer, 150, each=check)
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
    (-flow.log_prob(data).mean() + layer.penalty()).backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    clone = copy.deepcopy(layer)
    assert clone.penalty().item() == 0.0
    torch.testing.assert_close(clone.log_abs_det(), layer.log_abs_det())
    view = layer.with_cache(0)
    flow0 = dist.TransformedDistribution(_standard_normal(4), [view])
    flow0.log_prob(torch.randn(8, 4, dtype=torch.float64))
    assert layer.penalty() is not None and layer._tracker is view._tracker


def test_docstring_example_runs():
    result = doctest.testmod(snf_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------- the fits
def test_trained_layer_reconstructs_below_1e_3():
    layer = _layer(8, "inverse", scale=0.0, sync=True)
    mix = _train_density(layer, 600, decay=0.995)
    data = torch.randn(4096, 8, dtype=torch.float64) @ mix.T + 1.0
    u = data - layer.bias.detach()
    with torch.no_grad():
        error = ((u @ layer.W.T) @ layer.R.T - u).square().sum(-1).mean()
    assert error < 1e-3


@pytest.mark.slow
def test_density_model_fits_and_samples():
    """Two SNF layers and a leaky softplus (exact="inverse"): exact scoring, fast sampling."""
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
        # The data's covariance has eigenvalues down to 0.06: lambda = 10 keeps
        # lambda * variance above 1/8 (see test_stability_needs_lambda_times_variance).
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
    """exact="forward" in AutoNormalizingFlow, trained by SVI with the penalty in the loss."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    cov = torch.tensor(
        [[2.0, 0.8, 0.3, 0.0], [0.8, 1.0, 0.2, 0.1], [0.3, 0.2, 0.5, 0.1], [0.0, 0.1, 0.1, 1.5]]
    )
    loc = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def model():
        pyro.sample("z", dist.MultivariateNormal(loc, cov))

    guide = AutoNormalizingFlow(model, partial(self_normalizing_linear, exact="forward"))
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
