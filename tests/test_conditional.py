"""Conditional layers of every family and the conditional flow builder."""

import doctest
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import pyro_lunet
from pyro_lunet import conditional as conditional_module
from pyro_lunet import conditional_flow, conditional_linear, families

D, C = 4, 3


def _randomize(layer, scale=0.3):
    """Moves the layer off its identity init: random W, bias and context network."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))


def _make(family, role, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = conditional_linear(D, C, layer=family, role=role, hidden_dims=[8]).to(dtype)
    _randomize(layer)
    # SNF's training mode is approximate by design (R for W^-1, a tracked
    # log-det); its eval mode is exact, which is what these checks need.
    return layer.eval() if family == "self_normalizing" else layer


def _dense_per_row(layer, context):
    """exp(s(c_i)) diag times weight(): the Jacobian of row i, from the pieces."""
    s, t = layer.log_scale_and_shift(context)
    return s.exp().unsqueeze(-1) * layer.linear.weight(), s, t


FAMILY_ROLE = [(f, r) for f in families() for r in ("guide", "density")]


@pytest.mark.parametrize("family,role", FAMILY_ROLE)
def test_jacobian_and_log_det_match_autograd(family, role, one_thread):
    layer = _make(family, role)
    contexts = torch.randn(5, C, dtype=torch.float64)
    x = torch.randn(5, D, dtype=torch.float64)
    transform = layer.condition(contexts)
    y = transform(x)
    log_det = transform.log_abs_det_jacobian(x, y)
    assert log_det.shape == (5,)
    dense, s, t = _dense_per_row(layer, contexts)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(
            lambda v, i=i: layer.condition(contexts[i]).with_cache(0)(v), x[i]
        )
        torch.testing.assert_close(jac, dense[i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        y, (dense @ x.unsqueeze(-1)).squeeze(-1) + s.exp() * _bias(layer) + t
    )


def _bias(layer):
    b = layer.linear.bias
    return torch.zeros(D, dtype=torch.float64) if b is None else b


@pytest.mark.parametrize("family,role", FAMILY_ROLE)
def test_inverse_round_trip_without_cache(family, role, one_thread):
    layer = _make(family, role)
    contexts = torch.randn(6, C, dtype=torch.float64)
    x = torch.randn(6, D, dtype=torch.float64)
    y = layer.condition(contexts)(x)
    # A fresh conditioned transform has no cached pair: this runs the inverse.
    x_back = layer.condition(contexts).inv(y)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    inv = layer.condition(contexts).inv
    torch.testing.assert_close(
        inv.log_abs_det_jacobian(y, x), -layer.condition(contexts).log_abs_det_jacobian(x, y)
    )


@pytest.mark.parametrize("family", families())
def test_identity_at_initialization(family, one_thread):
    torch.manual_seed(0)
    layer = conditional_linear(D, C, layer=family)
    contexts = torch.randn(7, C)
    x = torch.randn(7, D)
    transform = layer.condition(contexts)
    y = transform(x)
    # SNF's default init adds noise of std 0.01/sqrt(D) to the identity.
    tol = 0.05 if family == "self_normalizing" else 1e-6
    torch.testing.assert_close(y, x, rtol=0, atol=tol)
    torch.testing.assert_close(
        transform.log_abs_det_jacobian(x, y), torch.zeros(7), rtol=0, atol=tol
    )
    s, t = layer.log_scale_and_shift(contexts)
    assert torch.equal(s, torch.zeros_like(s)) and torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("family,role", FAMILY_ROLE)
def test_batched_contexts_broadcast_with_exact_rows(family, role, one_thread):
    layer = _make(family, role)
    contexts = torch.randn(3, 1, C, dtype=torch.float64)
    x = torch.randn(4, D, dtype=torch.float64)
    transform = layer.condition(contexts)
    y = transform(x)
    log_det = transform.log_abs_det_jacobian(x, y)
    assert y.shape == (3, 4, D) and log_det.shape == (3, 4)
    x_back = layer.condition(contexts).inv(y)
    assert x_back.shape == (3, 4, D)
    for i in range(3):
        for j in range(4):
            single = layer.condition(contexts[i, 0])
            y_ij = single(x[j])
            torch.testing.assert_close(y[i, j], y_ij, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(
                log_det[i, j], single.log_abs_det_jacobian(x[j], y_ij), rtol=1e-12, atol=1e-12
            )
            torch.testing.assert_close(x_back[i, j], x[j], rtol=1e-10, atol=1e-10)
    # An unbatched input against a batch of contexts, and the reverse.
    z = torch.randn(D, dtype=torch.float64)
    out = layer.condition(contexts[:, 0])(z)
    assert out.shape == (3, D)
    torch.testing.assert_close(out[1], layer.condition(contexts[1, 0])(z))
    many = torch.randn(2, 3, D, dtype=torch.float64)
    assert layer.condition(contexts[0, 0])(many).shape == (2, 3, D)


def test_bad_shapes_and_types_raise_value_errors():
    layer = conditional_linear(D, C, layer="lu")
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\), got \(5, 2\)"):
        layer.condition(torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\), got \(\)"):
        layer.condition(torch.tensor(1.0))
    with pytest.raises(ValueError, match="context Tensor, got list"):
        layer.condition([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="dtype torch.float32, got torch.float64"):
        layer.condition(torch.randn(C, dtype=torch.float64))
    transform = layer.condition(torch.randn(5, C))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\), got \(5, 3\)"):
        transform(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\), got \(5, 3\)"):
        transform.inv(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"broadcasts with the context's \(5,\), got \(6, 4\)"):
        transform(torch.randn(6, D))
    with pytest.raises(ValueError, match="dtype torch.float32, got torch.float64"):
        transform(torch.randn(5, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="context_dim must be a positive int, got 0"):
        conditional_linear(D, 0)
    with pytest.raises(ValueError, match="hidden_dims must be a list"):
        conditional_linear(D, C, hidden_dims=8)
    with pytest.raises(ValueError, match="available families"):
        conditional_linear(D, C, layer="dense")
    with pytest.raises(ValueError, match="InvertibleLinear"):
        conditional_linear(D, C, layer=lambda d: torch.nn.Identity())
    with pytest.raises(ValueError, match="log_scale_bound"):
        conditional_linear(D, C, log_scale_bound=0.0)


def test_gradients_reach_the_context_network_and_the_layer(one_thread):
    layer = _make("butterfly", "guide", dtype=torch.float32)
    cond = dist.ConditionalTransformedDistribution(
        dist.Normal(torch.zeros(D), 1.0).to_event(1), [layer]
    )
    contexts, x = torch.randn(8, C), torch.randn(8, D)
    cond.condition(contexts).log_prob(x).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_stale_results_after_an_optimizer_step(one_thread):
    layer = _make("lu", "guide", dtype=torch.float32)
    transform = layer.condition(torch.randn(4, C))
    x = torch.randn(4, D)
    y = transform(x)
    assert transform(x) is y  # the cached pair, while nothing changed
    log_det = transform.log_abs_det_jacobian(x, y)
    opt = torch.optim.SGD(layer.context_net.parameters(), lr=0.5)
    (y.square().sum() + log_det.sum()).backward()
    opt.step()
    y2 = transform(x)
    assert not torch.allclose(y2, y)
    fresh = layer.condition(transform.context).with_cache(0)
    torch.testing.assert_close(y2, fresh(x))
    torch.testing.assert_close(
        transform.log_abs_det_jacobian(x, y2), fresh.log_abs_det_jacobian(x, y2)
    )
    # Without a backward pass in between: an in-place write to the context network.
    with torch.no_grad():
        y3 = transform(x)
        layer.context_net[-1].bias.add_(0.5)
        y4 = transform(x)
        assert not torch.allclose(y3, y4)
        torch.testing.assert_close(y4, layer.condition(transform.context).with_cache(0)(x))
        x5 = torch.randn(4, D)
        torch.testing.assert_close(
            transform.log_abs_det_jacobian(x5, transform(x5)),
            layer.condition(transform.context).log_abs_det_jacobian(x5, x5),
        )


def test_dtype_and_module_moves(one_thread):
    layer = conditional_linear(D, C, layer="circulant").double()
    transform = layer.condition(torch.randn(2, C, dtype=torch.float64))
    y = transform(torch.randn(2, D, dtype=torch.float64))
    assert y.dtype == torch.float64
    layer.float()
    assert layer.condition(torch.randn(C))(torch.randn(D)).dtype == torch.float32


@pytest.mark.parametrize("family", families())
@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_conditional_flow_in_conditional_transformed_distribution(family, coupling, one_thread):
    torch.manual_seed(1)
    flow = conditional_flow(D, C, num_blocks=1, layer=family, coupling=coupling, role="density")
    flow.double()
    if family == "self_normalizing":
        flow.eval()
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    cond = dist.ConditionalTransformedDistribution(base, [flow])
    contexts = torch.randn(6, C, dtype=torch.float64)
    x = torch.randn(6, D, dtype=torch.float64)
    d = cond.condition(contexts)
    assert d.batch_shape == (6,) and d.event_shape == (D,)
    log_p = d.log_prob(x)
    assert log_p.shape == (6,) and torch.isfinite(log_p).all()
    # The same number by hand, part by part, one context at a time.
    for i in range(6):
        parts = [t.condition(contexts[i]) for t in flow.transforms]
        value, total = x[i], 0.0
        for part in reversed(parts):
            prev = part.inv(value)
            total = total - part.log_abs_det_jacobian(prev, value)
            value = prev
        torch.testing.assert_close(log_p[i], base.log_prob(value) + total)
    assert d.sample().shape == (6, D)
    assert d.rsample(torch.Size([2])).shape == (2, 6, D)
    one = cond.condition(contexts[0])
    assert one.sample(torch.Size([5])).shape == (5, D)


def test_conditional_flow_argument_errors():
    with pytest.raises(ValueError, match="coupling must be one of"):
        conditional_flow(D, C, coupling="neural")
    with pytest.raises(ValueError, match="input_dim >= 2, got 1"):
        conditional_flow(1, C)
    with pytest.raises(ValueError, match="num_blocks must be a non-negative int, got -1"):
        conditional_flow(D, C, num_blocks=-1)
    with pytest.raises(ValueError, match="one of .*'lu'.*got 'dense'"):
        conditional_flow(D, C, layer="dense")
    with pytest.raises(ValueError, match="role must be one of"):
        conditional_flow(D, C, role="forward")


def test_conditional_density_fit_approaches_the_truth(one_thread):
    """x | c ~ N(A c, diag(sigma(c))^2 rotated): the fit's NLL nears the true one."""
    torch.manual_seed(0)
    dx, dc, n = 2, 2, 2048
    A = torch.tensor([[1.0, -0.5], [0.3, 0.8]])
    rot = torch.tensor([[0.8, -0.6], [0.6, 0.8]])

    def sample(m):
        c = torch.randn(m, dc)
        scales = torch.stack([0.3 * torch.exp(0.5 * c[:, 0]), 0.6 * torch.ones(m)], -1)
        noise = (torch.randn(m, dx) * scales) @ rot.T
        log_p = (
            dist.Normal(0.0, scales).log_prob(noise @ rot).sum(-1)
        )  # rot is orthogonal: |det| = 1
        return c @ A.T + noise, c, log_p

    x, c, true_log_p = sample(n)
    flow = conditional_flow(dx, dc, num_blocks=1, layer="lu", role="density", hidden_dims=[32])
    cond = dist.ConditionalTransformedDistribution(
        dist.Normal(torch.zeros(dx), 1.0).to_event(1), [flow]
    )
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    start = -cond.condition(c).log_prob(x).mean().item()
    for _ in range(400):
        idx = torch.randint(0, n, (256,))
        opt.zero_grad()
        (-cond.condition(c[idx]).log_prob(x[idx]).mean()).backward()
        opt.step()
    xt, ct, true_t = sample(n)
    with torch.no_grad():
        nll = -cond.condition(ct).log_prob(xt).mean().item()
    truth = -true_t.mean().item()
    assert start - truth > 1.0  # the problem is far from the initial flow
    assert nll - truth < 0.1, (start, nll, truth)


def test_amortized_guide_in_a_plate_with_subsampling(one_thread):
    """q(z | x_i) for z ~ N(0, I), x | z ~ N(M z, s^2 I): KL(q || posterior) shrinks."""
    torch.manual_seed(0)
    pyro.clear_param_store()
    n, dz, dx, sigma = 512, 2, 3, 0.5
    M = torch.tensor([[1.0, 0.5], [-0.7, 1.0], [0.3, -0.2]])
    z_true = torch.randn(n, dz)
    data = z_true @ M.T + sigma * torch.randn(n, dx)

    def model(data):
        with pyro.plate("data", n, subsample_size=64) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(dz), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ M.T, sigma).to_event(1), obs=data[idx])

    # One conditional mixer with an affine context map holds the exact
    # posterior family, N(m + K x, S): the fit must reach it.
    flow = conditional_flow(dz, dx, num_blocks=0, layer="butterfly", context_hidden_dims=[])
    cond = dist.ConditionalTransformedDistribution(
        dist.Normal(torch.zeros(dz), 1.0).to_event(1), [flow]
    )

    def guide(data):
        pyro.module("flow", flow)
        with pyro.plate("data", n, subsample_size=64) as idx:
            pyro.sample("z", cond.condition(data[idx]))

    # -ELBO per point = KL(q(z|x) || p(z|x)) - log p(x): the gap to the exact
    # evidence is the amortized KL.
    evidence = dist.MultivariateNormal(
        torch.zeros(dx), M @ M.T + sigma**2 * torch.eye(dx)
    ).log_prob(data)

    def kl_gap(num_particles=64):
        with torch.no_grad():
            q = cond.condition(data)
            z = q.sample(torch.Size([num_particles]))
            log_joint = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(
                z @ M.T, sigma
            ).log_prob(data).sum(-1)
            return (q.log_prob(z) - log_joint).mean(0).add(evidence).mean().item()

    before = kl_gap()
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(300):
        svi.step(data)
    after = kl_gap()
    assert before > 0.5 and after < 0.03, (before, after)
    # The amortized posterior mean matches the exact one.
    post_cov = torch.linalg.inv(torch.eye(dz) + M.T @ M / sigma**2)
    post_mean = data @ M @ post_cov / sigma**2
    with torch.no_grad():
        draws = cond.condition(data[:16]).sample(torch.Size([2000]))
    torch.testing.assert_close(draws.mean(0), post_mean[:16], rtol=0, atol=0.1)
    assert math.isfinite(after)


def test_exports_and_doctests():
    for name in conditional_module.__all__:
        assert getattr(pyro_lunet, name) is getattr(conditional_module, name)
        assert name in pyro_lunet.__all__
    failures, tried = doctest.testmod(conditional_module, verbose=False)
    assert tried > 0 and failures == 0


@pytest.mark.parametrize("family", families())
def test_empty_batches_and_float32(family, one_thread):
    torch.manual_seed(2)
    layer = conditional_linear(D, C, layer=family)
    _randomize(layer, scale=0.1)
    layer.eval()
    transform = layer.condition(torch.randn(0, C))
    y = transform(torch.randn(0, D))
    assert y.shape == (0, D) and transform.log_abs_det_jacobian(y, y).shape == (0,)
    contexts, x = torch.randn(16, C), torch.randn(16, D)
    y = layer.condition(contexts)(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(layer.condition(contexts).inv(y), x, rtol=1e-4, atol=1e-4)


def test_gradients_reach_a_computed_context(one_thread):
    """An encoder's output as the context (amortization through a learned summary)."""
    torch.manual_seed(3)
    encoder = torch.nn.Linear(5, C)
    layer = _make("circulant", "density", dtype=torch.float32)
    context = encoder(torch.randn(8, 5))
    transform = layer.condition(context)
    x = torch.randn(8, D)
    y = transform(x)
    (y.square().sum() + transform.log_abs_det_jacobian(x, y).sum()).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", families())
def test_a_guide_scores_its_own_samples_exactly_in_training_mode(family, one_thread):
    """log q of a fresh sample reuses the sampled pair (SNF's guide-role inverse is R)."""
    torch.manual_seed(4)
    flow = conditional_flow(D, C, num_blocks=1, layer=family, role="guide")
    for part in flow.transforms:
        _randomize(part, scale=0.05)
    base = dist.Normal(torch.zeros(D), 1.0).to_event(1)
    transform = flow.condition(torch.randn(6, C))
    eps = base.sample(torch.Size([6]))
    z = transform(eps)
    log_q = dist.TransformedDistribution(base, [transform]).log_prob(z)
    expected = base.log_prob(eps) - transform.log_abs_det_jacobian(eps, z)
    torch.testing.assert_close(log_q, expected)
