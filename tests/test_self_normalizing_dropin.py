"""Self-normalizing layers are drop-in: no penalty, no special ELBO, exact in eval mode.

The layer applies its reconstruction gradient in its own backward pass, so
unmodified ``pyro.infer.SVI`` with ``Trace_ELBO`` and a plain PyTorch loop
with no penalty in the loss both train it; ``penalty()`` only reports the
term, or re-weights it when added to a loss.
"""

from __future__ import annotations

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

from pyro_lunet import self_normalizing_linear
from pyro_lunet.transforms import self_normalizing as snf_module

pytestmark = pytest.mark.usefixtures("one_thread")


def _standard_normal(dim, dtype=torch.float64):
    zero = torch.zeros(dim, dtype=dtype)
    return dist.Normal(zero, torch.ones_like(zero)).to_event(1)


def _far_layer(dim, exact, seed=0, **kwargs):
    """A float64 layer with W away from the identity and R far from W^-1."""
    torch.manual_seed(seed)
    role = {"forward": "guide", "inverse": "density"}[exact]
    layer = self_normalizing_linear(dim, role=role, **kwargs).double()
    with torch.no_grad():
        layer.W.add_(0.3 * torch.randn(dim, dim, dtype=torch.float64))
        layer.RT.add_(0.5 * torch.randn(dim, dim, dtype=torch.float64))
        layer.bias.copy_(torch.randn(dim, dtype=torch.float64))
    eye = torch.eye(dim, dtype=torch.float64)
    assert (layer.R.detach() @ layer.W.detach() - eye).abs().max() > 0.3
    return layer


def _inverse_error(layer):
    W, R = layer.W.detach(), layer.R.detach()
    return (R @ W - torch.eye(W.shape[0], dtype=W.dtype)).square().sum()


def _grads(layer):
    return {name: p.grad.clone() for name, p in layer.named_parameters()}


# ------------------------------------------------------------------ fits
def correlated_gaussian():
    """``(loc, cov, model)``: a correlated 4-D Gaussian posterior with no data."""
    cov = torch.tensor(
        [[2.0, 0.8, 0.3, 0.0], [0.8, 1.0, 0.2, 0.1], [0.3, 0.2, 0.5, 0.1], [0.0, 0.1, 0.1, 1.5]]
    )
    loc = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def model():
        pyro.sample("z", dist.MultivariateNormal(loc, cov))

    return loc, cov, model


def test_guide_trains_with_unmodified_svi_and_trace_elbo():
    """role="guide" in AutoNormalizingFlow, plain ``SVI`` + ``Trace_ELBO()`` (one particle;
    at D = 4 the exact identity probes), no penalty anywhere: the guide fits a correlated Gaussian.

    ClippedAdam writes through ``.data`` (parameter versions unchanged) and
    its decay damps the one-particle noise; over 3 seeds the errors were at
    most 0.16 (mean) and 0.14 (covariance).
    """
    pyro.clear_param_store()
    torch.manual_seed(0)
    loc, cov, model = correlated_gaussian()

    guide = AutoNormalizingFlow(model, partial(self_normalizing_linear, role="guide"))
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.996}), Trace_ELBO())
    losses = torch.tensor([svi.step() for _ in range(800)])
    assert torch.isfinite(losses).all()
    layer = guide.transform
    assert _inverse_error(layer) < 0.2**2  # R followed W^-1 with no penalty in the loss
    with torch.no_grad():
        z = guide.get_posterior().sample((20000,))
    assert z.abs().max() < 50
    torch.testing.assert_close(z.mean(0), loc, atol=0.3, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.3, rtol=0)
    # The fitted guide's own Gaussian (exact, from W and b) agrees.
    W, b = layer.W.detach(), layer.bias.detach()
    torch.testing.assert_close(b, loc, atol=0.3, rtol=0)
    torch.testing.assert_close(W @ W.T, cov, atol=0.3, rtol=0)


def test_plain_loop_without_penalty_reaches_the_gaussian_mle():
    """One layer, no penalty in the loss, data with covariance eigenvalues from 0.013 to 16
    (where the old data-based term stalled 2.3 nats above): the MLE to 0.05 nats."""
    torch.manual_seed(0)
    dim = 8
    A = 0.5 * torch.randn(dim, dim) + 1.5 * torch.eye(dim)
    data = torch.randn(4096, dim) @ A.T + 1.0
    layer = self_normalizing_linear(dim)
    flow = dist.TransformedDistribution(_standard_normal(dim, torch.float32), [layer])
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(1500):
        batch = data[torch.randint(0, len(data), (256,))]
        opt.zero_grad()
        (-flow.log_prob(batch).mean()).backward()
        opt.step()
    layer.eval()
    with torch.no_grad():
        nll = -flow.log_prob(data).mean()
        mean = data.mean(0)
        centred = data - mean
        mle = -dist.MultivariateNormal(mean, centred.T @ centred / len(data)).log_prob(data).mean()
    assert mle - 1e-3 < nll < mle + 0.05  # it ended 0.010 above
    assert _inverse_error(layer) < 0.05  # R ends near W^-1 (||R W - I||_F^2 was 0.01)


# -------------------------------------------------------------- eval mode
@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_eval_log_prob_is_exact_whatever_r_is(approximate, grad):
    """role="guide" (a guide) scores external points with R in training mode; in eval mode
    ``log_prob`` is the exact density of y = W x + b, with R far from W^-1."""
    dim = 5
    layer = _far_layer(dim, "forward", approximate=approximate)
    base = _standard_normal(dim)
    flow = dist.TransformedDistribution(base, [layer])
    y = 2 * torch.randn(7, dim, dtype=torch.float64)
    W, b = layer.W.detach(), layer.bias.detach()
    x = torch.linalg.solve(W, (y - b).T).T
    expected = base.log_prob(x) - torch.linalg.slogdet(W)[1]
    if approximate:  # the premise: training mode's fast side (R) is far off
        assert (flow.log_prob(y) - expected).abs().max() > 0.1
    layer.eval()
    with torch.set_grad_enabled(grad):
        for _ in range(2):  # the second call may answer from the memoized LU
            torch.testing.assert_close(flow.log_prob(y), expected, rtol=0, atol=1e-10)
            torch.testing.assert_close(layer.inv(y), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_eval_sampling_side_is_exact_whatever_r_is(approximate, grad):
    """role="density" (a density model) samples with R in training mode; in eval mode
    ``layer(x)`` is W^-1 x + b exactly, with R far from W^-1."""
    dim = 5
    layer = _far_layer(dim, "inverse", approximate=approximate)
    x = torch.randn(7, dim, dtype=torch.float64)
    W, b = layer.W.detach(), layer.bias.detach()
    expected = torch.linalg.solve(W, x.T).T + b
    if approximate:
        assert (layer(x) - expected).abs().max() > 0.1
    layer.eval()
    with torch.set_grad_enabled(grad):
        for _ in range(2):
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
            torch.testing.assert_close(
                layer.log_abs_det(), -torch.linalg.slogdet(W)[1], rtol=0, atol=1e-10
            )
    flow = dist.TransformedDistribution(_standard_normal(dim), [layer])
    torch.testing.assert_close(
        flow.log_prob(expected),
        _standard_normal(dim).log_prob(x) + torch.linalg.slogdet(W)[1],
        rtol=0,
        atol=1e-10,
    )


# ---------------------------------------------------------------- penalty
@pytest.mark.parametrize("exact", ["forward", "inverse"])
def test_penalty_right_after_a_training_forward_is_the_exact_term(exact):
    """For D <= N the forward's estimate is exact: lambda ||R W - I||_F^2."""
    dim, lam = 4, 0.6
    layer = _far_layer(dim, exact, reconstruction_weight=lam)
    x = torch.randn(6, dim, dtype=torch.float64)
    layer(x) if exact == "forward" else layer.inv(x)
    torch.testing.assert_close(layer.penalty(), lam * _inverse_error(layer), rtol=1e-12, atol=0)
    assert layer.penalty().requires_grad
    with torch.no_grad():
        assert not layer.penalty().requires_grad


@pytest.mark.parametrize("rows", [9, 2], ids=["identity probes", "random probes"])
@pytest.mark.parametrize("c", [3.0, 0.25])
def test_c_times_penalty_trains_as_weight_c_lambda(rows, c, monkeypatch):
    """``loss + c * penalty()`` gives the gradients of the layer built with weight c * lambda
    and no penalty in its loss (same parameters, same probes)."""
    monkeypatch.setattr(snf_module, "_MIN_PROBES", 1)  # random probes as soon as N < D
    dim, lam = 4, 0.6
    x = torch.randn(rows, dim, dtype=torch.float64)
    upstream = torch.randn(rows, dim, dtype=torch.float64)
    grads = []
    for weight, add in [(lam, c), (c * lam, None)]:
        layer = _far_layer(dim, "inverse", reconstruction_weight=weight)
        torch.manual_seed(5)  # the same random probes for rows < dim
        out = layer.inv(x)
        loss = (upstream * out).sum() - 1.3 * layer.log_abs_det()
        if add is not None:
            loss = loss + add * layer.penalty()
        loss.backward()
        grads.append(_grads(layer))
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-12, atol=1e-12)


def test_penalty_is_finite_after_an_empty_batch_and_after_double():
    dim = 3
    layer = self_normalizing_linear(dim)
    out = layer.inv(torch.randn(0, dim))  # an empty batch, in training mode
    (out.sum() + layer.log_abs_det()).backward()
    empty = layer.penalty()
    assert torch.isfinite(empty) and empty.dtype == torch.float32
    torch.testing.assert_close(empty.detach(), _inverse_error(layer))

    flow = dist.TransformedDistribution(_standard_normal(dim, torch.float32), [layer])
    flow.log_prob(torch.randn(8, dim))  # a record in float32 ...
    layer.double()  # ... outlived by the parameters it was made from
    value = layer.penalty()
    assert torch.isfinite(value) and value.dtype == torch.float64
    torch.testing.assert_close(value.detach(), _inverse_error(layer))
    value.backward()
    assert torch.isfinite(layer.W.grad).all() and layer.W.grad.dtype == torch.float64
    flow64 = dist.TransformedDistribution(_standard_normal(dim), [layer])
    (-flow64.log_prob(torch.randn(8, dim, dtype=torch.float64)).mean()).backward()
    assert torch.isfinite(layer.penalty())


def test_zero_weight_means_no_term_and_a_zero_penalty():
    dim = 4
    x = torch.randn(6, dim, dtype=torch.float64)
    grads = []
    for weight, zero_times in [(0.0, False), (1.0, True)]:
        layer = _far_layer(dim, "inverse", reconstruction_weight=weight)
        if weight == 0:
            assert layer.penalty().item() == 0.0  # before a forward
        loss = layer.inv(x).square().sum() + layer.log_abs_det()
        if zero_times:
            loss = loss + 0.0 * layer.penalty()  # weight 0 * lambda: the data part alone
        else:
            assert layer.penalty().item() == 0.0  # after one
        loss.backward()
        grads.append(_grads(layer))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-12, atol=1e-12)
