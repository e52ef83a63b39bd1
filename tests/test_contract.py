"""The contract suite: every transform family, every check.

A family joins with one ``Case`` line in ``CASES``.
"""

from __future__ import annotations

from functools import partial

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    testing,
)
from pyro_lunet.testing import forward, inverse, total_log_det, use
from tests.contract import Case


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


def _cases_and_dims(cases=CASES):
    return [pytest.param(c, d, id=f"{c.name}-D{d}") for c in cases for d in c.dims]


# ----------------------------------------------------------------- the map
@pytest.mark.parametrize("case, dim", _cases_and_dims())
def test_jacobian_matches_log_det(case, dim, dtype, device):
    testing.check_jacobian(case.build(dim, dtype, device), dim, linear=case.linear)


@pytest.mark.parametrize("case, dim", _cases_and_dims())
def test_inverse_jacobian_is_inverse_matrix(case, dim, dtype, device):
    testing.check_inverse_jacobian(case.build(dim, dtype, device), dim)


@pytest.mark.parametrize("case, dim", _cases_and_dims())
def test_round_trip_bypassing_cache(case, dim, dtype, device):
    testing.check_round_trip(case.build(dim, dtype, device), dim)


# --------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("batch", [(), (7,), (6, 5)], ids=str)
def test_batch_shapes(case, batch, dtype, device):
    testing.check_batch_shape(case.build(5, dtype, device), 5, batch)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_empty_batch(case, dtype, device):
    testing.check_empty_batch(case.build(5, dtype, device), 5)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dtypes(case, dtype, device):
    testing.check_dtype(case.build(16, dtype, device), 16, dtype)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_bad_input_raises_clear_errors(case, dtype, device):
    testing.check_bad_input(case.build(4, dtype, device), 4)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_parameters_are_contiguous(case):
    testing.check_contiguous_parameters(case.make(5))


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_every_parameter_gets_a_finite_gradient(case, dtype, device):
    testing.check_gradients(case.build(5, dtype, device), 5)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_stale_result_after_optimizer_step(case, mode, dtype, device):
    t = case.build(5, dtype, device)
    testing.check_no_stale_cache(t.train(mode == "train"), 5)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_two_backward_passes_on_one_tensor_without_a_step(case, dtype, device):
    testing.check_gradient_accumulation(case.build(4, dtype, device), 4)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_cached_rsample_log_prob_matches_uncached(case, dtype, device):
    testing.check_cached_rsample(case.build(5, dtype, device), 5)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_training_on_fresh_batches_frees_each_batch(case, dtype, device):
    dim = case.dims[-1]
    testing.check_frees_batches(case.build(dim, dtype, device), dim)


# ------------------------------------------------------------ serialization
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_deepcopy_pickle_and_torch_save_round_trips(case, dtype, device):
    testing.check_copies(use(case.build(4, dtype, device)), 4)


@pytest.mark.parametrize("case", TRAINABLE, ids=repr)
def test_state_dict_round_trip(case, dtype, device):
    t = use(case.build(4, dtype, device))
    testing.check_state_dict(t, case.build(4, dtype, device, seed=1), 4)


# ---------------------------------------------------------------- with Pyro
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_transformed_distribution_log_prob_is_change_of_variables(case, dtype, device):
    testing.check_change_of_variables(case.build(5, dtype, device), 5)


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
def test_auto_normalizing_flow_fits_correlated_gaussian(case, loss, device):
    # The suite's own, longer fit in float32 (check_layer's default is cheaper).
    testing.check_guide(
        case.make,
        dtype=torch.float32,
        device=device,
        steps=1000,
        atol=0.15,
        num_particles=32,
        elbo=PenalizedELBO if loss == "PenalizedELBO" else None,
    )


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
    """The whole contract runs on CUDA with ``--device cuda``; this is the smoke test."""
    dim = 16
    t = case.build(dim, device="cuda")
    d = dist.TransformedDistribution(testing.standard_normal(dim, device="cuda"), [t])
    data = torch.randn(32, dim, dtype=torch.float64, device="cuda")
    loss = -d.log_prob(data).mean()
    if case.has_parameters:
        loss.backward()
        assert all(p.grad.device.type == "cuda" for p in t.parameters())
    y = d.rsample((5,))
    assert y.device.type == "cuda"
    testing.check_round_trip(t, dim)
    if case.has_parameters:
        testing.check_bad_input(t, dim)
