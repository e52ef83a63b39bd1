"""The builders: every family, both roles, exact log-determinants, and guides that fit."""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import TransformModule
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormalizingFlow

import pyro_lunet
from pyro_lunet import (
    FAMILIES,
    LAYERS,
    Family,
    Flow,
    LeakySoftplus,
    PenalizedELBO,
    activation_flow,
    coupling_flow,
    lu_linear,
    psis_khat,
    register_family,
)
from pyro_lunet.transforms.base import InvertibleLinear

logging.getLogger("pyro").setLevel(logging.WARNING)
BUILDERS = [activation_flow, coupling_flow]
NAMES = sorted(LAYERS)


def _jacobian_log_det(fn, x: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(fn, x)
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("role", ["guide", "density"])
@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("name", NAMES)
def test_builders_are_exact_bijections_for_every_family(name, builder, role):
    torch.manual_seed(0)
    flow = builder(4, 2, layer=name, role=role).to(torch.float64).eval()
    assert isinstance(flow, Flow) and isinstance(flow, TransformModule)
    x = torch.randn(4, dtype=torch.float64)
    if role == "guide":  # sampling is the exact side: check f and log|det df|
        y = flow(x)
        expected = _jacobian_log_det(lambda v: flow(v), x)
        assert torch.allclose(flow.log_abs_det_jacobian(x, y), expected, atol=1e-8)
        back = flow.inv(y.clone())  # a fresh tensor: no cache hit
    else:  # scoring is the exact side: check f^-1 and log|det df^-1|
        y = x
        z = flow.inv(y)
        expected = _jacobian_log_det(lambda v: flow.inv(v), y)
        assert torch.allclose(-flow.log_abs_det_jacobian(z, y), expected, atol=1e-8)
        back = flow(z.clone())
    assert torch.allclose(back, x, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_role_orients_layers_and_activations(name):
    for role, inverse in (("guide", False), ("density", True)):
        flow = activation_flow(3, 2, layer=name, role=role)
        acts = [p for p in flow.parts if isinstance(p, LeakySoftplus)]
        assert len(acts) == 2 and all(a.inverse is inverse for a in acts)
        layers = [p for p in flow.parts if isinstance(p, InvertibleLinear)]
        assert len(layers) == 3
        assert {p.role for p in layers} == {role}  # the builder's role, passed straight through


@pytest.mark.parametrize("name", NAMES)
def test_coupling_mixers_start_as_rotations(name):
    torch.manual_seed(0)
    flow = coupling_flow(6, 2, layer=name)
    mixers = [p for p in flow.parts if isinstance(p, InvertibleLinear)]
    assert len(mixers) == 3 and len(flow.parts) == 5
    eye = torch.eye(6)
    # The first mixer keeps the given order; the later ones start as rotations.
    assert torch.allclose(mixers[0].weight().detach(), eye, atol=0.05)
    for mixer in mixers[1:]:
        w = mixer.weight().detach()
        assert torch.allclose(w @ w.T, eye, atol=1e-4)  # orthogonal...
        assert not torch.allclose(w.abs(), eye, atol=0.1)  # ...and not a signed permutation
    # A user's init holds for every mixer.
    flow = coupling_flow(6, 2, layer=name, layer_kwargs={"init": "identity"})
    for mixer in (flow.parts[2], flow.parts[4]):
        assert torch.allclose(mixer.weight().detach(), eye, atol=0.05)


def test_family_by_factory_and_by_name():
    flow = activation_flow(3, 1, layer=partial(lu_linear, role="density"))
    assert all(p.role == "density" for p in flow.parts if isinstance(p, InvertibleLinear))
    with pytest.raises(ValueError, match="functools.partial"):
        activation_flow(3, 1, layer=lu_linear, layer_kwargs={"bias": False})
    flow = coupling_flow(3, 1, layer="lu", coupling="spline", layer_kwargs={"bias": False})
    assert flow.parts[0].bias is None
    assert isinstance(flow.parts[1], dist.transforms.SplineCoupling)


def test_unknown_family_lists_available():
    with pytest.raises(ValueError, match=r"available families \[.*'lu'.*\].*'nope'"):
        activation_flow(3, 1, layer="nope")


def test_registry_lists_every_family_as_a_record():
    assert pyro_lunet.families() == ["lu", "butterfly", "circulant", "rank_one", "self_normalizing"]
    assert LAYERS is FAMILIES and list(LAYERS) == pyro_lunet.families()
    for name, family in FAMILIES.items():
        assert isinstance(family, Family) and family.name == name
    directional = {n for n, f in FAMILIES.items() if f.directional}
    assert directional == {"lu", "self_normalizing"}
    assert {n for n, f in FAMILIES.items() if f.maintenance} == {"rank_one"}
    with pytest.raises(TypeError):  # read-only: families join by registering
        FAMILIES["ghost"] = FAMILIES["lu"]
    with pytest.raises(dataclasses.FrozenInstanceError):  # a frozen record
        FAMILIES["lu"].directional = False


def test_a_registered_family_reaches_every_builder_and_the_command_line():
    from pyro_lunet.cli.checkpoint import flow_names, parse_flow

    def ghost_linear(input_dim, role="guide", **kwargs):
        return lu_linear(input_dim, role=role, **kwargs)

    register_family("ghost", ghost_linear, directional=True)
    try:
        assert "ghost" in pyro_lunet.families()
        flow = activation_flow(3, 1, layer="ghost", role="density")
        assert flow.parts[0].role == "density"
        assert isinstance(coupling_flow(3, 1, layer="ghost").parts[0], InvertibleLinear)
        assert "coupling:ghost" in flow_names() and parse_flow("activation:ghost")[1] == "ghost"
        with pytest.raises(ValueError, match="already registered"):
            register_family("ghost", lu_linear)
    finally:
        FAMILIES.unregister("ghost")
    with pytest.raises(ValueError, match="'ghost'") as info:
        coupling_flow(3, 1, layer="ghost")
    assert "'lu'" in str(info.value) and "'ghost'," not in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_every_family_accepts_and_validates_role(name):
    for role in ("guide", "density"):
        assert FAMILIES[name].factory(3, role=role).role == role
    with pytest.raises(ValueError, match="role"):
        FAMILIES[name].factory(3, role="sideways")


def test_deprecated_direction_keywords_warn_and_still_work():
    with pytest.warns(DeprecationWarning, match="role='density'"):
        flow = activation_flow(3, 1, layer="lu", layer_kwargs={"product": "inverse"})
    assert flow.parts[0].role == "density"
    with pytest.warns(DeprecationWarning, match="role='guide'"):
        flow = coupling_flow(3, 1, layer="self_normalizing", layer_kwargs={"exact": "forward"})
    assert flow.parts[0].role == "guide"
    with pytest.raises(ValueError, match="role= only"):
        lu_linear(3, role="density", product="inverse")
    with pytest.raises(ValueError, match="pass role='density' to the builder"):
        activation_flow(3, 1, layer="lu", layer_kwargs={"role": "density"})


def test_bad_arguments():
    with pytest.raises(ValueError, match="input_dim >= 2"):
        coupling_flow(1, 1)
    with pytest.raises(ValueError, match="role"):
        activation_flow(3, 1, role="sampler")
    with pytest.raises(ValueError, match="num_blocks"):
        activation_flow(3, -1)
    with pytest.raises(ValueError, match="coupling"):
        coupling_flow(3, 1, coupling="neural")


def test_exported_from_package():
    for name in ("activation_flow", "coupling_flow", "LAYERS", "layer_factory", "FAMILIES",
                 "Family", "families", "register_family"):  # fmt: skip
        assert name in pyro_lunet.__all__ and hasattr(pyro_lunet, name)


# ------------------------------------------------------------------ SVI guides
def _fit(model, guide, steps, lr=1e-2, particles=8, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = pyro.optim.Adam({"lr": lr})
    # Rank-one merges every 25 steps: with the decayed rate of these short fits,
    # resetting v's moments every 10 steps (the scheduler's default) slows them.
    elbo = PenalizedELBO(
        Trace_ELBO(num_particles=particles, vectorize_particles=True), optim, merge_every=25
    )
    svi = SVI(model, guide, optim, elbo)
    for _ in range(steps):
        svi.step()
    return guide


def _elbo(model, guide, num_particles=4000, seed=123):
    pyro.set_rng_seed(seed)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    with torch.no_grad():
        return -elbo.loss(model, guide)


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("name", NAMES)
def test_one_line_guide_for_every_family(name, builder):
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    pyro.set_rng_seed(0)
    guide = AutoNormalizingFlow(model, partial(builder, num_blocks=1, layer=name))
    _fit(model, guide, 3)
    assert guide()["b"].shape == (2,)
    assert torch.isfinite(torch.as_tensor(_elbo(model, guide, 64)))


LOC = torch.tensor([0.5, -0.8, 0.2])
COV = torch.tensor([[1.0, 0.8, -0.3], [0.8, 2.0, 0.4], [-0.3, 0.4, 0.5]])


def correlated_gaussian():
    pyro.sample("z", dist.MultivariateNormal(LOC, COV))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lu", "rank_one", "self_normalizing"])
def test_single_layer_guide_recovers_correlated_gaussian(name):
    """One dense-expressive layer is a Gaussian guide: the optimum is the exact posterior.

    (Rank-one layers reach a full matrix through merges, here on PenalizedELBO's
    cadence; self-normalizing ones train through their surrogate gradients.)
    """
    pyro.set_rng_seed(0)
    guide = AutoNormalizingFlow(
        correlated_gaussian, partial(activation_flow, num_blocks=0, layer=name)
    )
    # Rank-one layers get there one merged rank-one step at a time: 32 merges.
    steps = 800 if name == "rank_one" else 500
    _fit_decayed(correlated_gaussian, guide, steps, particles=8, lr=5e-2)
    flow = guide.transform
    layer = flow.parts[0]
    layer.eval()
    w = layer.weight().detach()
    assert torch.allclose(layer.bias.detach(), LOC, atol=0.1)
    assert torch.allclose(w @ w.T, COV, atol=0.15)
    # KL(q || p) = -ELBO here (the model is normalized).
    assert _elbo(correlated_gaussian, guide) > -0.03


def _schedule(steps, lr=1e-2, final=0.1):
    """Adam with the learning rate decayed to ``final * lr`` over ``steps``."""
    return pyro.optim.ClippedAdam({"lr": lr, "lrd": final ** (1 / steps)})


def _fit_decayed(model, guide, steps, *args, particles=16, seed=0, lr=1e-2):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = _schedule(steps, lr)
    # Rank-one merges every 25 steps: with the decayed rate of these short fits,
    # resetting v's moments every 10 steps (the scheduler's default) slows them.
    elbo = PenalizedELBO(
        Trace_ELBO(num_particles=particles, vectorize_particles=True), optim, merge_every=25
    )
    svi = SVI(model, guide, optim, elbo)
    for _ in range(steps):
        svi.step(*args)
    return guide


def funnel():
    """Neal's funnel (scale 1.5): y ~ N(0, 1.5^2), x | y ~ N(0, e^y); E x^2 = e^{1.125}."""
    y = pyro.sample("y", dist.Normal(0.0, 1.5))
    pyro.sample("x", dist.Normal(0.0, (y / 2).exp()))


@pytest.mark.slow
def test_coupling_guide_beats_multivariate_normal_on_a_funnel():
    pyro.set_rng_seed(0)
    flow_guide = _fit_decayed(
        funnel,
        AutoNormalizingFlow(funnel, partial(coupling_flow, num_blocks=1, hidden_dims=[16])),
        600,
    )
    pyro.set_rng_seed(0)
    mvn_guide = _fit_decayed(funnel, AutoMultivariateNormal(funnel), 600)
    elbo_flow, elbo_mvn = _elbo(funnel, flow_guide), _elbo(funnel, mvn_guide)
    pyro.set_rng_seed(1)
    khat_flow = psis_khat(funnel, flow_guide, num_samples=4000)
    pyro.set_rng_seed(1)
    khat_mvn = psis_khat(funnel, mvn_guide, num_samples=4000)
    # The model is normalized: -ELBO = KL(q || p) >= 0.
    assert elbo_mvn < -0.3 and elbo_flow > -0.1
    assert khat_flow.khat < 0.5 and khat_flow.reading == "good"
    assert khat_mvn.khat > khat_flow.khat + 0.2
    # Moments in closed form: E y = 0, Var y = 2.25, E x = 0, E x^2 = exp(1.125).
    pyro.set_rng_seed(2)
    draws = pyro_lunet.to_inference_data(funnel, flow_guide, num_samples=4000).posterior
    assert abs(float(draws["y"].mean())) < 0.15
    assert float(draws["y"].var()) == pytest.approx(2.25, rel=0.15)
    assert float((draws["x"] ** 2).mean()) == pytest.approx(math.exp(1.125), rel=0.25)


SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(y=SCHOOLS_Y, sigma=SCHOOLS_SIGMA):
    """Eight schools, non-centered: a small hierarchical model with a skewed tau."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


@pytest.fixture(scope="module")
def nuts_schools():
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(eight_schools), warmup_steps=150, num_samples=300, disable_progbar=True)
    mcmc.run()
    return mcmc


@pytest.mark.slow
def test_coupling_guide_matches_nuts_on_eight_schools(nuts_schools):
    import arviz as az

    ref = nuts_schools.get_samples()
    pyro.set_rng_seed(0)
    flow_guide = _fit_decayed(
        eight_schools,
        AutoNormalizingFlow(eight_schools, partial(coupling_flow, num_blocks=1, hidden_dims=[32])),
        400,
        particles=8,
    )
    pyro.set_rng_seed(0)
    mvn_guide = _fit_decayed(eight_schools, AutoMultivariateNormal(eight_schools), 400, particles=8)
    pyro.set_rng_seed(1)
    idata = pyro_lunet.to_inference_data(eight_schools, flow_guide, num_samples=2000)
    summary = az.summary(idata, var_names=["mu", "tau"], kind="stats")
    for name in ("mu", "tau"):
        mean, sd = ref[name].mean().item(), ref[name].std().item()
        assert abs(summary.loc[name, "mean"] - mean) < 0.5 * sd
        assert 0.5 < summary.loc[name, "sd"] / sd < 1.5
    elbo_flow, elbo_mvn = _elbo(eight_schools, flow_guide), _elbo(eight_schools, mvn_guide)
    pyro.set_rng_seed(1)
    khat_flow = psis_khat(eight_schools, flow_guide, num_samples=4000)
    pyro.set_rng_seed(1)
    khat_mvn = psis_khat(eight_schools, mvn_guide, num_samples=4000)
    assert elbo_flow > elbo_mvn + 0.5
    assert khat_flow.khat < 0.7 and khat_mvn.khat > khat_flow.khat + 0.2


def test_coupling_flow_networks_are_packed_and_load_pyro_network_checkpoints():
    """Affine couplings hold their network in one tensor (Pyro's SVI pays per tensor); a
    state dict from Pyro's own DenseNN couplings (checkpoints before) loads, same map."""
    from pyro.distributions.transforms import affine_coupling

    from pyro_lunet import Flow, lu_linear
    from pyro_lunet.transforms.packed_nn import PackedDenseNN

    torch.manual_seed(14)
    flow = coupling_flow(6, 2, layer="lu")
    couplings = [part for part in flow.parts if hasattr(part, "nn")]
    assert all(type(c.nn) is PackedDenseNN for c in couplings)
    assert [len(list(c.parameters())) for c in couplings] == [1, 1]
    old = Flow([lu_linear(6), affine_coupling(6), lu_linear(6), affine_coupling(6), lu_linear(6)])
    for p in old.parameters():
        p.data.normal_(0.0, 0.3)
    flow.load_state_dict(old.state_dict())
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(flow(x), old(x))
        torch.testing.assert_close(flow.inv(x), old.inv(x))
