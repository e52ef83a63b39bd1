"""The contract suite: every transform family, every check.

A family joins with one ``Case`` line in ``CASES``.
"""

from __future__ import annotations

import copy
import io
import pickle
import weakref
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

from pyro_lunet import (
    PenalizedELBO,
    SelfNormalizingLinear,
    butterfly_linear,
    circulant_diagonal_linear,
    families,
    leaky_softplus,
    lu_linear,
    lu_net,
    rank_one_updated_linear,
    self_normalizing_linear,
)
from tests.contract import Case, forward, inverse, jacobian, total_log_det


def _merge_rank_one_updates(module, rounds=3):
    """Folds a few random rank-one updates into A, leaving a last one unmerged."""
    with torch.no_grad():
        for _ in range(rounds):
            module.merge_()
            module.u.copy_(torch.randn_like(module.u) / (2 * module.input_dim**0.5))


_BUTTERFLY_DIMS = (1, 2, 3, 5, 7, 16, 64, 100)

CASES = [
    Case("lu", partial(lu_linear, init="orthogonal")),
    # Odd and prime D pass coordinates through; block_levels=2 chains several
    # grouped products; num_levels=2 leaves low bits unmixed.
    Case("butterfly", partial(butterfly_linear, init="orthogonal"), dims=_BUTTERFLY_DIMS),
    Case(
        "butterfly-groups-nobias",
        partial(butterfly_linear, init="rotation", block_levels=2, bias=False),
        dims=_BUTTERFLY_DIMS,
        guide=False,  # the same map as "butterfly", grouped differently
    ),
    Case(
        "butterfly-partial",
        lambda d: butterfly_linear(d, num_levels=min(2, (d - 1).bit_length()), block_levels=1),
        dims=_BUTTERFLY_DIMS,
        guide=False,  # at the guide test's D = 4 this is the full butterfly
    ),
    Case("circulant", circulant_diagonal_linear, dims=(1, 2, 3, 4, 5, 16, 64)),
    Case("circulant-m3", partial(circulant_diagonal_linear, num_factors=3, init="orthogonal")),
    # One D C D's signs are fixed at init: from random ones it may not reach the
    # SVI target's covariance (from the identity it does, as "circulant" shows).
    Case(
        "circulant-nobias",
        partial(circulant_diagonal_linear, init="orthogonal", bias=False),
        guide=False,
    ),
    Case("lu-inverse", partial(lu_linear, init="orthogonal", role="density")),
    Case("lu-nobias", partial(lu_linear, init="orthogonal", bias=False)),
    Case("lu-net", partial(lu_net, num_blocks=2), linear=False),
    Case(
        "lu-net-inverse",
        partial(lu_net, num_blocks=2, role="density"),
        linear=False,
        guide=False,  # the density-model orientation
    ),
    # One layer reaches a full covariance only through merges, which it runs
    # itself inside plain SVI.
    Case("rank-one", rank_one_updated_linear),
    Case(
        "rank-one-merged",
        partial(rank_one_updated_linear, init="reverse"),
        prepare=_merge_rank_one_updates,
        guide=False,
    ),
    Case(
        "rank-one-merged-nobias",
        partial(rank_one_updated_linear, bias=False),
        prepare=_merge_rank_one_updates,
        guide=False,
    ),
    # SNF: the exact solve on the fast side makes round trips exact; the
    # perturbed W gets R = W^-1 and an exact log-det anchor back by prepare.
    # Its reconstruction gradient is its own: plain Trace_ELBO trains it.
    Case(
        "self-normalizing",
        partial(self_normalizing_linear, role="guide", approximate=False),
        prepare=SelfNormalizingLinear.sync_inverse,
    ),
    Case(
        "self-normalizing-inverse",
        partial(self_normalizing_linear, role="density", approximate=False),
        prepare=SelfNormalizingLinear.sync_inverse,
        guide=False,
    ),
    Case(
        "self-normalizing-approx-nobias",
        partial(self_normalizing_linear, role="density", bias=False),
        prepare=SelfNormalizingLinear.sync_inverse,
        guide=False,
    ),
    Case("leaky-softplus", lambda d: leaky_softplus(0.1), linear=False, has_parameters=False),
    Case(
        "leaky-softplus-inverse",
        lambda d: leaky_softplus(0.3, inverse=True),
        linear=False,
        has_parameters=False,
    ),
]
TRAINABLE = [c for c in CASES if c.has_parameters]


def test_every_registered_family_has_a_case():
    """A family registered (``register_family``) but missing here would go unchecked."""
    names = {case.name for case in CASES}
    assert [f for f in families() if f.replace("_", "-") not in names] == []


def _standard_normal(dim, dtype=torch.float64, device="cpu"):
    zero = torch.zeros(dim, dtype=dtype, device=device)
    return dist.Normal(zero, torch.ones_like(zero)).to_event(1)


def _cases_and_dims(cases=CASES):
    return [pytest.param(c, d, id=f"{c.name}-D{d}") for c in cases for d in c.dims]


# ----------------------------------------------------------------- the map
@pytest.mark.parametrize("case, dim", _cases_and_dims())
def test_jacobian_matches_log_det(case, dim):
    t = case.build(dim)
    x = torch.randn(dim, dtype=torch.float64)
    jac = jacobian(partial(forward, t), x)
    y = forward(t, x)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(total_log_det(t, x, y), logabsdet, rtol=1e-9, atol=1e-9)
    if case.linear:
        torch.testing.assert_close(t.weight(), jac, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(t.log_abs_det(), logabsdet, rtol=1e-9, atol=1e-9)
        bias = torch.zeros(dim, dtype=x.dtype) if t.bias is None else t.bias
        torch.testing.assert_close(y, t.weight() @ x + bias, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case, dim", _cases_and_dims())
def test_inverse_jacobian_is_inverse_matrix(case, dim):
    t = case.build(dim)
    x = torch.randn(dim, dtype=torch.float64)
    y = forward(t, x)
    jac_inv = jacobian(partial(inverse, t), y)
    torch.testing.assert_close(
        jac_inv @ jacobian(partial(forward, t), x), torch.eye(dim, dtype=x.dtype)
    )


@pytest.mark.parametrize("case, dim", _cases_and_dims())
def test_round_trip_bypassing_cache(case, dim):
    t = case.build(dim)
    x = torch.randn(9, dim, dtype=torch.float64) * 3
    assert (inverse(t, forward(t, x)) - x).abs().max() < 1e-10
    y = torch.randn(9, dim, dtype=torch.float64) * 3
    assert (forward(t, inverse(t, y)) - y).abs().max() < 1e-10


# --------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("batch", [(), (7,), (6, 5)], ids=str)
def test_batch_shapes(case, batch):
    dim = 5
    t = case.build(dim)
    x = torch.randn(*batch, dim, dtype=torch.float64)
    y = forward(t, x)
    assert y.shape == x.shape
    ladj = total_log_det(t, x, y)
    assert ladj.shape == batch
    rows = x.reshape(-1, dim)
    expected = torch.stack([forward(t, r) for r in rows]).reshape(x.shape)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(inverse(t, y), x)
    per_row = torch.stack([total_log_det(t, r, forward(t, r)) for r in rows]).reshape(batch)
    torch.testing.assert_close(ladj, per_row)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dtypes(case, dtype):
    dim = 16
    t = case.build(dim, dtype=dtype)
    x = torch.randn(11, dim, dtype=dtype)
    y = t(x)
    assert y.dtype == dtype
    assert total_log_det(t, x, y).dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert (inverse(t, y) - x).abs().max() < tol


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_bad_input_raises_clear_errors(case):
    t = case.build(4)
    good = torch.randn(3, 4, dtype=torch.float64)
    y = t(good)
    bad_inputs = {
        "4": torch.randn(3, 5, dtype=torch.float64),
        "float64": torch.randn(3, 4, dtype=torch.float32),
        "cpu": torch.empty(3, 4, dtype=torch.float64, device="meta"),
    }
    for expected, bad in bad_inputs.items():
        for direction in (t, t.inv):
            with pytest.raises(ValueError, match=expected):
                direction(bad)
    with pytest.raises(ValueError):
        t(torch.tensor(1.0, dtype=torch.float64))
    # A failed call corrupts nothing: the cache still answers the good pair.
    assert t(good) is y
    torch.testing.assert_close(inverse(t, y), good)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_parameters_are_contiguous(case):
    """Pyro's param store copies a non-contiguous Parameter: the module's own would never train."""
    t = case.make(5)
    assert all(p.is_contiguous() for p in t.parameters())


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_every_parameter_gets_a_finite_gradient(case):
    dim = 5
    t = case.build(dim)
    d = dist.TransformedDistribution(_standard_normal(dim), [t])
    loss = -d.log_prob(torch.randn(32, dim, dtype=torch.float64)).mean()
    loss.backward()
    grads = [p.grad for p in t.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_stale_result_after_optimizer_step(case, mode):
    dim = 5
    t = case.build(dim)
    t.train(mode == "train")
    d = dist.TransformedDistribution(_standard_normal(dim), [t])
    data = torch.randn(64, dim, dtype=torch.float64)
    opt = torch.optim.SGD(t.parameters(), lr=0.05)
    for _ in range(3):  # full-batch on one tensor, no clear_cache() (pyro#2542)
        opt.zero_grad()
        loss = -d.log_prob(data).mean()
        loss.backward()
        opt.step()
        fresh = copy.deepcopy(t)
        fresh.clear_cache()
        expected = dist.TransformedDistribution(_standard_normal(dim), [fresh]).log_prob(data)
        torch.testing.assert_close(d.log_prob(data), expected)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_two_backward_passes_on_one_tensor_without_a_step(case):
    dim = 4
    t = case.build(dim)
    d = dist.TransformedDistribution(_standard_normal(dim), [t])
    data = torch.randn(16, dim, dtype=torch.float64)
    (-d.log_prob(data).mean()).backward()
    first = [p.grad.clone() for p in t.parameters()]
    (-d.log_prob(data).mean()).backward()  # gradient accumulation
    for g0, p in zip(first, t.parameters()):
        torch.testing.assert_close(p.grad, 2 * g0)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_cached_rsample_log_prob_matches_uncached(case):
    dim = 5
    t = case.build(dim)
    d = dist.TransformedDistribution(_standard_normal(dim), [t])
    y = d.rsample((8,))
    cached = d.log_prob(y)
    uncached = dist.TransformedDistribution(_standard_normal(dim), [t.with_cache(0)])
    torch.testing.assert_close(cached, uncached.log_prob(y.detach().clone()))
    assert t.with_cache(t._cache_size) is t


# ------------------------------------------------------------ serialization
def _used(case, dim=4):
    """A module after a forward, a backward and an optimizer step: caches full."""
    t = case.build(dim)
    d = dist.TransformedDistribution(_standard_normal(dim), [t])
    if case.has_parameters:
        opt = torch.optim.Adam(t.parameters(), lr=0.01)
        (-d.log_prob(torch.randn(8, dim, dtype=torch.float64)).mean()).backward()
        opt.step()
    d.log_prob(d.rsample((3,)))
    return t


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_deepcopy_pickle_and_torch_save_round_trips(case):
    t = _used(case)
    x = torch.randn(6, 4, dtype=torch.float64)
    expected = forward(t, x)
    for clone in (
        copy.deepcopy(t),
        pickle.loads(pickle.dumps(t)),
        _torch_round_trip(t),
    ):
        torch.testing.assert_close(forward(clone, x), expected)
        torch.testing.assert_close(inverse(clone, expected), inverse(t, expected))


def _torch_round_trip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_state_dict_round_trip(case):
    t = _used(case)
    other = case.build(4, seed=1)
    other.load_state_dict(t.state_dict())
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(forward(other, x), forward(t, x))
    torch.testing.assert_close(
        total_log_det(other, x, forward(t, x)), total_log_det(t, x, forward(t, x))
    )


# ---------------------------------------------------------------- with Pyro
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_transformed_distribution_log_prob_is_change_of_variables(case):
    dim = 5
    t = case.build(dim)
    base = _standard_normal(dim)
    y = torch.randn(10, dim, dtype=torch.float64)
    x = inverse(t, y)
    manual = base.log_prob(x) - total_log_det(t, x, y)
    torch.testing.assert_close(dist.TransformedDistribution(base, [t]).log_prob(y), manual)


def _correlated_gaussian_model(loc, scale_tril):
    def model():
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    return model


# Every family is drop-in with Pyro's own ELBO; PenalizedELBO (the explicit
# control of penalties and merges) is checked on the families it acts on.
_GUIDE_RUNS = [(c, "Trace_ELBO") for c in TRAINABLE if c.guide] + [
    (c, "PenalizedELBO")
    for c in TRAINABLE
    if c.guide and c.name in ("rank-one", "self-normalizing")
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "loss"), _GUIDE_RUNS, ids=[f"{c.name}-{loss}" for c, loss in _GUIDE_RUNS]
)
def test_auto_normalizing_flow_fits_correlated_gaussian(case, loss):
    pyro.clear_param_store()
    torch.manual_seed(0)
    cov = torch.tensor(
        [[2.0, 0.8, 0.3, 0.0], [0.8, 1.0, 0.2, 0.1], [0.3, 0.2, 0.5, 0.1], [0.0, 0.1, 0.1, 1.5]]
    )
    # AutoNormalizingFlow's base is N(0, I): without a bias nothing can shift it.
    can_shift = all(getattr(m, "bias", 0) is not None for m in case.make(4).modules())
    loc = torch.tensor([1.0, -2.0, 0.5, 3.0]) if can_shift else torch.zeros(4)
    model = _correlated_gaussian_model(loc, torch.linalg.cholesky(cov))
    guide = AutoNormalizingFlow(model, case.make)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.997})
    elbo = Trace_ELBO(num_particles=32, vectorize_particles=True)
    if loss == "PenalizedELBO":
        elbo = PenalizedELBO(elbo, optim)
    svi = SVI(model, guide, optim, elbo)
    for _ in range(1000):
        svi.step()
    with torch.no_grad():
        z = guide.get_posterior().sample((20000,))
    torch.testing.assert_close(z.mean(0), loc, atol=0.15, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.15, rtol=0)


# ------------------------------------------------------------------ property
@settings(max_examples=25, deadline=None)
@given(
    case=st.sampled_from(CASES),
    dim=st.integers(1, 40),
    batch=st.lists(st.integers(1, 4), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_property_round_trip_and_log_det_shape(case, dim, batch, seed):
    t = case.build(dim, seed=seed)
    x = torch.randn(*batch, dim, dtype=torch.float64)
    y = forward(t, x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert total_log_det(t, x, y).shape == tuple(batch)
    assert (inverse(t, y) - x).abs().max() < 1e-9


# ---------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_cuda(case):
    dim = 16
    t = case.build(dim).to("cuda")
    d = dist.TransformedDistribution(_standard_normal(dim, device="cuda"), [t])
    data = torch.randn(32, dim, dtype=torch.float64, device="cuda")
    loss = -d.log_prob(data).mean()
    if case.has_parameters:
        loss.backward()
        assert all(p.grad.device.type == "cuda" for p in t.parameters())
    y = d.rsample((5,))
    assert y.device.type == "cuda"
    assert (inverse(t, forward(t, data)) - data).abs().max() < 1e-9
    if case.has_parameters:
        with pytest.raises(ValueError, match="cuda"):
            t(data.cpu())


@pytest.mark.parametrize("case", [c for c in CASES if c.has_parameters], ids=lambda c: c.name)
def test_training_on_fresh_batches_frees_each_batch(case):
    """The pair cache holds the last batch only: no earlier one stays alive (no leak)."""
    dim = case.dims[-1]
    flow = case.make(dim).double()
    model = dist.TransformedDistribution(_standard_normal(dim), [flow])
    params = [p for p in flow.parameters() if p.requires_grad]
    alive = []
    for _ in range(3):
        x = torch.randn(8, dim, dtype=torch.float64)
        alive.append(weakref.ref(x))
        (-model.log_prob(x).mean()).backward()
        for p in params:
            p.grad = None
        del x
    assert [ref() is None for ref in alive[:-1]] == [True, True]
