"""AutoFlowNormal: a flow autoguide over every family, checked against closed-form answers."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import AffineCoupling
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_mean, init_to_value

import pyro_lunet
from pyro_lunet import AutoFlowNormal, psis_khat, to_inference_data
from pyro_lunet.autoguide import StandardBase, default_flow_config
from pyro_lunet.transforms.packed_nn import PackedDenseNN

Y = torch.tensor([[0.3, 1.9], [1.2, 2.4], [-0.4, 1.1], [0.9, 2.8]])  # 4 observations of 2-D


def conjugate(y=Y):
    """mu ~ N(0, I_2), y_i ~ N(mu, I_2): posterior N(sum y / (n + 1), I / (n + 1))."""
    with pyro.plate("coords", 2, dim=-1):
        mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=y.dtype), 1.0))
        with pyro.plate("data", y.shape[0], dim=-2):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def hierarchical():
    """A positive site (log-normal), a plated site and a vector site: 1 + 3 + 2 = 6 latents."""
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("groups", 3):
        pyro.sample("theta", dist.Normal(0.0, scale))
    pyro.sample("v", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def scalar_model():
    pyro.sample("s", dist.Normal(1.0, 2.0))


@pytest.fixture(autouse=True)
def _fresh():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def test_conjugate_posterior_recovered(one_thread):
    n = Y.shape[0]
    post_mean, post_sd = Y.sum(0) / (n + 1), math.sqrt(1 / (n + 1))
    guide = AutoFlowNormal(conjugate)
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True)
    svi = SVI(conjugate, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99}), elbo)
    for _ in range(300):
        svi.step()
    with torch.no_grad():
        draws = guide.get_posterior().sample((20000,))
    assert torch.allclose(draws.mean(0), post_mean, atol=0.05), (draws.mean(0), post_mean)
    assert torch.allclose(draws.std(0), torch.full((2,), post_sd), rtol=0.1), draws.std(0)
    # the summaries agree with the closed form too
    assert torch.allclose(guide.median()["mu"], post_mean, atol=0.06)
    q = guide.quantiles([0.1, 0.9])["mu"]
    z = 1.2815515655446004  # Phi^-1(0.9)
    expected = torch.stack([post_mean - z * post_sd, post_mean + z * post_sd])
    assert torch.allclose(q, expected, atol=0.08), (q, expected)
    assert float(psis_khat(conjugate, guide, num_samples=1000)) < 0.5


@pytest.mark.parametrize("layer", pyro_lunet.families())
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO], ids=lambda e: e.__name__)
def test_every_family_takes_an_svi_step(layer, elbo):
    guide = AutoFlowNormal(hierarchical, layer=layer)
    svi = SVI(hierarchical, guide, pyro.optim.Adam({"lr": 1e-2}), elbo())
    before = None
    for _ in range(2):
        loss = svi.step()
        assert math.isfinite(loss)
        if before is None:
            before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    moved = [k for k, v in guide.named_parameters() if not torch.equal(before[k], v.detach())]
    assert any(k.startswith("flow.") for k in moved), moved  # the flow is trained, not only loc
    assert guide.config["architecture"] == "coupling"


@pytest.mark.parametrize("layer", ["lu", "circulant"])
def test_activation_architecture(layer):
    guide = AutoFlowNormal(hierarchical, layer=layer, architecture="activation", num_blocks=2)
    svi = SVI(hierarchical, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step())
    assert not any(isinstance(m, pyro.distributions.transforms.AffineCoupling)
                   for m in guide.modules())  # fmt: skip


@pytest.mark.parametrize("layer", ["lu", "butterfly"])
def test_tanh_couplings(layer):
    guide = AutoFlowNormal(hierarchical, layer=layer, coupling_nonlinearity="tanh",
                           precondition=None, num_blocks=3)  # fmt: skip
    svi = SVI(hierarchical, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step())
    nets = [
        m.nn for m in guide.modules() if isinstance(m, pyro.distributions.transforms.AffineCoupling)
    ]
    assert len(nets) == 3 and all(isinstance(n.f, torch.nn.Tanh) for n in nets)
    # the last coupling conditions the later sites on the leading one ("scale", 1 coordinate)
    assert guide.flow[-1].split_dim == 1


def test_coupling_log_scales_softly_bounded():
    guide = AutoFlowNormal(
        hierarchical, log_scale_bounds=(1.5, 2.5), precondition=None, num_blocks=3
    )
    guide()
    couplings = [m for m in guide.modules() if isinstance(m, AffineCoupling)]
    assert len(couplings) == 3
    for coupling, bound in zip(couplings, [1.5, 1.5, 2.5]):  # the mixing ones, then the last
        net = coupling.nn
        assert isinstance(net, PackedDenseNN)  # one parameter tensor, a flow kernel
        with torch.no_grad():
            last_bias = net.layer_params()[-1]  # a view of the packed parameter
            last_bias.fill_(50.0)  # far past the bound
            high = net(torch.zeros(1, coupling.split_dim))[1]
            last_bias.fill_(-50.0)
            low = net(torch.zeros(1, coupling.split_dim))[1]
            # slope 1 at 0: small log-scales pass unchanged
            last_bias.copy_(torch.linspace(-1e-3, 1e-3, last_bias.numel()))
            small = net(torch.zeros(1, coupling.split_dim))[1]
            expected = last_bias[-small.shape[-1] :].clone()
        assert torch.allclose(high, torch.tensor(bound)) and torch.allclose(
            low, -torch.tensor(bound)
        )
        assert torch.allclose(small, expected, atol=1e-8)
    plain = AutoFlowNormal(hierarchical, log_scale_bounds=None)
    plain()
    nets = [m.nn for m in plain.modules() if isinstance(m, AffineCoupling)]
    assert all(net.log_scale_bounds is None for net in nets)


def eight_schools():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
        y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def test_centered_eight_schools_stays_finite(one_thread):
    # With Pyro's hard clip (log_scale_bounds=None: the gradient passes the clip) this
    # run overflowed at step 79: a coupling kept growing until a draw of log tau was inf.
    guide = AutoFlowNormal(eight_schools, layer="butterfly")
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    svi = SVI(eight_schools, guide, pyro.optim.ClippedAdam({"lr": 5e-3, "lrd": 0.998}), elbo)
    for _ in range(200):
        assert math.isfinite(svi.step())


def test_scalar_model_uses_activation_flow():
    guide = AutoFlowNormal(scalar_model)
    guide()
    assert guide.latent_dim == 1 and guide.config["architecture"] == "activation"
    with pytest.raises(ValueError, match="latent dimension >= 2"):
        AutoFlowNormal(scalar_model, architecture="coupling")()


def test_vectorized_particles_match_one_at_a_time():
    guide = AutoFlowNormal(hierarchical, layer="butterfly")
    elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(hierarchical, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    for _ in range(3):
        assert math.isfinite(svi.step())
    # The guide's density of a batch of its draws is the density of each draw.
    posterior = guide.get_posterior()
    with torch.no_grad():
        draws = posterior.sample((6,))
        batched = posterior.log_prob(draws)
        rows = torch.stack([guide.get_posterior().log_prob(d.clone()) for d in draws])
    assert batched.shape == (6,)
    assert torch.allclose(batched, rows, atol=1e-5), (batched, rows)


@pytest.mark.parametrize(("model", "args"), [(conjugate, (Y,)), (hierarchical, ())])
@pytest.mark.parametrize("parallel", [False, True])
def test_predictive(model, args, parallel):
    guide = AutoFlowNormal(model)
    guide(*args)
    gaussian = AutoNormal(model)  # the shapes Pyro's own autoguides give
    samples = Predictive(model, guide=guide, num_samples=11, parallel=parallel)(*args)
    expected = Predictive(model, guide=gaussian, num_samples=11, parallel=parallel)(*args)
    assert {k: v.shape for k, v in samples.items()} == {k: v.shape for k, v in expected.items()}
    for name in guide.prototype_trace.stochastic_nodes:  # the latent sites vary
        assert samples[name].shape[0] == 11 and (samples[name].std(0) > 0).all()


@pytest.mark.parametrize("architecture", ["coupling", "activation"])
def test_init_loc_fn_is_the_median_at_init(architecture):
    values = {"scale": torch.tensor(2.0), "theta": torch.tensor([-1.0, 0.5, 3.0]),
              "v": torch.tensor([0.25, -0.75])}  # fmt: skip
    guide = AutoFlowNormal(hierarchical, architecture=architecture, precondition=None,
                           init_loc_fn=init_to_value(values=values))  # fmt: skip
    median = guide.median()
    assert set(median) == set(values)
    for name, value in values.items():
        assert median[name].shape == value.shape
        assert torch.allclose(median[name], value, atol=1e-5), (name, median[name], value)


def test_init_to_mean_honoured():
    guide = AutoFlowNormal(hierarchical, init_loc_fn=init_to_mean, precondition=None)
    median = guide.median()
    assert torch.allclose(median["scale"], torch.tensor(math.exp(0.5**2 / 2)), atol=1e-5)
    assert torch.allclose(median["v"], torch.zeros(2), atol=1e-6)


@pytest.mark.parametrize("base_df, z95", [(None, 1.6448536), (10.0, 1.8124611), (3.0, 2.3533634)])
def test_quantiles_at_init_are_the_base_ones(base_df, z95):
    # At initialization the coupling flow is the identity (its first mixer starts there,
    # its coupling at zero), so every unconstrained coordinate is init + init_scale * eps_i
    # with eps_i the base's (normal or Student-t: z95 is its 0.95 quantile); quantiles of a
    # positive site are exp of those.
    values = {"scale": torch.tensor(2.0), "theta": torch.zeros(3), "v": torch.tensor([1.0, -1.0])}
    guide = AutoFlowNormal(hierarchical, init_loc_fn=init_to_value(values=values), init_scale=0.5,
                           num_quantile_samples=40000, precondition=None,
                           base_df=base_df)  # fmt: skip
    probs = [0.05, 0.5, 0.95]
    q = guide.quantiles(probs)
    assert q["scale"].shape == (3,) and q["theta"].shape == (3, 3) and q["v"].shape == (3, 2)
    z = torch.tensor([-z95, 0.0, z95])
    assert torch.allclose(q["scale"], (math.log(2.0) + 0.5 * z).exp(), rtol=0.03)
    assert torch.allclose(q["v"], torch.tensor([1.0, -1.0]) + 0.5 * z[:, None], atol=0.03)
    assert (q["theta"].diff(dim=0) > 0).all()
    assert guide.quantiles(torch.tensor([0.5]))["v"].shape == (1, 2)


def test_float64_model_gives_float64_guide():
    y = Y.double()
    guide = AutoFlowNormal(conjugate, layer="butterfly")
    svi = SVI(conjugate, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step(y))
    assert {p.dtype for p in guide.parameters()} == {torch.float64}
    assert guide.median(y)["mu"].dtype == torch.float64
    assert guide.quantiles([0.5], y)["mu"].dtype == torch.float64


def test_diagnostics_accept_the_guide():
    guide = AutoFlowNormal(hierarchical)
    guide()
    idata = to_inference_data(hierarchical, guide, num_samples=100)
    assert dict(idata.posterior["theta"].sizes) == {"chain": 1, "draw": 100, "theta_dim_0": 3}
    khat = psis_khat(hierarchical, guide, num_samples=200)
    assert math.isfinite(float(khat)) or float(khat) == -math.inf


def test_default_config_by_dimension():
    assert default_flow_config(1)["architecture"] == "activation"
    for dim in (2, 10, 31, 200):
        config = default_flow_config(dim)
        assert config["architecture"] == "coupling" and config["num_blocks"] >= 1
    with pytest.raises(ValueError, match="latent_dim"):
        default_flow_config(0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": "nope"}, r"one of the families \['lu'.*got 'nope'"),
        ({"layer": 3}, "got 3"),
        ({"init_scale": 0.0}, "init_scale must be a positive finite number, got 0.0"),
        ({"init_scale": -1.0}, "positive finite number, got -1.0"),
        ({"init_scale": float("nan")}, "got nan"),
        ({"init_scale": "big"}, "got 'big'"),
        ({"architecture": "dense"}, r"architecture must be one of \['coupling', 'activation'\]"),
        ({"num_blocks": -1}, "num_blocks must be an int >= 0, got -1"),
        ({"hidden_dims": [0]}, r"hidden_dims must be a non-empty list of positive ints, got \[0\]"),
        ({"architecture": "activation", "hidden_dims": [8]}, "hidden_dims applies to"),
        ({"init_loc_fn": 1.0}, "init_loc_fn must be callable, got 1.0"),
        ({"num_quantile_samples": 0}, "num_quantile_samples must be an int >= 1, got 0"),
        ({"coupling_nonlinearity": "gelu"}, "must be 'relu' or 'tanh', got 'gelu'"),
        ({"log_scale_bounds": (-1.0, 3.0)}, r"two positive finite numbers, or None, got \(-1.0, 3"),
        ({"log_scale_bounds": 3.0}, "log_scale_bounds must be"),
        ({"log_scale_bounds": (2.0, float("inf"))}, "log_scale_bounds must be"),
        ({"precondition": "hessian"}, r"precondition must be one of \['auto', 'laplace', None\]"),
        ({"base_df": 0.0}, "base_df must be a positive finite number or None, got 0.0"),
        ({"base_df": float("inf")}, "base_df must be .* got inf"),
        ({"base_df": True}, "base_df must be .* got True"),
        ({"base_df": "10"}, "base_df must be .* got '10'"),
    ],
)
def test_bad_arguments_name_expected_and_got(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoFlowNormal(hierarchical, **kwargs)


def test_bad_quantiles():
    guide = AutoFlowNormal(hierarchical)
    with pytest.raises(ValueError, match=r"quantiles must lie in \[0, 1\], got \[0.5, 1.5\]"):
        guide.quantiles([0.5, 1.5])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        guide.quantiles([])


# ------------------------------------------------------------------ Laplace preconditioner
def funnel():
    """Neal's funnel: the log density grows without bound towards y -> -inf: no usable mode."""
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(9), (y / 2).exp()).to_event(1))


@pytest.mark.parametrize("base_df", [None, 10.0])
def test_laplace_preconditioner_is_the_posterior_of_a_gaussian_model(base_df):
    # Laplace is exact here, so before any step the guide is already the posterior (with a
    # normal base; with a Student-t base, the Student-t of the posterior's centre and scale).
    n = Y.shape[0]
    init = init_to_value(values={"mu": torch.ones(2)})
    guide = AutoFlowNormal(conjugate, init_loc_fn=init, base_df=base_df)
    guide()
    assert guide.preconditioned and guide.config["num_blocks"] == 1
    assert guide.precondition_note.startswith("Laplace approximation at the MAP (PSIS k-hat")
    post_mean, post_sd = Y.sum(0) / (n + 1), math.sqrt(1 / (n + 1))
    assert torch.allclose(guide.median()["mu"], post_mean, atol=1e-4)  # the MAP, not the init
    assert torch.allclose(guide.precondition_tril, torch.eye(2) * post_sd, atol=1e-4)
    with torch.no_grad():
        draws = guide.get_posterior().sample((20000,))
        log_q = guide.get_posterior().log_prob(draws)
    shape = (
        dist.Normal(post_mean, post_sd)
        if base_df is None
        else dist.StudentT(base_df, post_mean, post_sd)
    )
    exact = shape.to_event(1).log_prob(draws)
    assert torch.allclose(log_q, exact, atol=1e-4)
    # and SVI from there keeps it
    svi = SVI(conjugate, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(num_particles=8))
    for _ in range(20):
        svi.step()
    assert torch.allclose(guide.median()["mu"], post_mean, atol=0.05)


def test_laplace_preconditioner_refused_where_there_is_no_mode():
    guide = AutoFlowNormal(funnel)
    guide()
    assert not guide.preconditioned and guide.config["num_blocks"] == 1
    assert guide.precondition_note.startswith("not used: "), guide.precondition_note
    assert not hasattr(guide, "precondition_tril")
    with pytest.raises(ValueError, match="precondition='laplace' failed: "):
        AutoFlowNormal(funnel, precondition="laplace")()


def test_laplace_preconditioner_off_and_above_the_dimension_cap(monkeypatch):
    guide = AutoFlowNormal(conjugate, precondition=None)
    guide()
    assert not guide.preconditioned and guide.precondition_note == "off (precondition=None)"
    monkeypatch.setattr(pyro_lunet.autoguide, "LAPLACE_MAX_DIM", 1)
    guide = AutoFlowNormal(conjugate)
    guide()
    assert not guide.preconditioned and "a 2-D Hessian" in guide.precondition_note
    forced = AutoFlowNormal(conjugate, precondition="laplace")
    forced()
    assert forced.preconditioned


def test_laplace_search_leaves_no_sites_in_the_enclosing_trace():
    guide = AutoFlowNormal(conjugate)
    first = pyro.poutine.trace(guide).get_trace()  # sets up: MAP search, Hessian, k-hat draws
    second = pyro.poutine.trace(guide).get_trace()
    assert guide.preconditioned
    for trace in (first, second):
        assert trace.stochastic_nodes == ["_AutoFlowNormal_latent", "coords", "mu"]
    assert set(first.param_nodes) == set(second.param_nodes)


def test_laplace_preconditioned_guide_saves_and_moves():
    guide = AutoFlowNormal(conjugate)
    guide()
    state = {k: v.clone() for k, v in guide.state_dict().items()}
    assert {"precondition_loc", "precondition_tril"} <= set(state)
    guide.double()
    assert guide.precondition_tril.dtype == torch.float64
    assert guide.get_posterior().sample((3,)).dtype == torch.float64


def test_coupling_guide_mixers_are_bias_free_unless_asked():
    # The couplings' shifts and the guide's loc absorb a mixer's bias: one tensor less each.
    guide = AutoFlowNormal(hierarchical, precondition=None, num_blocks=3)
    guide()
    mixers = [p for p in guide.flow.parts if isinstance(p, pyro_lunet.LULinear)]
    assert len(mixers) == 3 and all(m.bias is None for m in mixers)
    pyro.clear_param_store()
    biased = AutoFlowNormal(hierarchical, precondition=None, layer_kwargs={"bias": True},
                            num_blocks=3)  # fmt: skip
    biased()
    assert all(p.bias is not None for p in biased.flow.parts if isinstance(p, pyro_lunet.LULinear))


def test_laplace_preconditioner_set_up_under_no_grad():
    # Predictive may be the first caller of a fresh guide, under no_grad.
    guide = AutoFlowNormal(conjugate)
    with torch.no_grad():
        Predictive(conjugate, guide=guide, num_samples=3)()
    assert guide.preconditioned, guide.precondition_note


# ------------------------------------------------------------------ the base distribution
@pytest.mark.parametrize("df", [None, 1.5, 10.0])
def test_standard_base_is_the_iid_student_t_or_normal(df):
    like = torch.zeros((), dtype=torch.float64)
    base = StandardBase(4, df, like)
    x = torch.randn(3, 5, 4, dtype=torch.float64) * 3
    one = dist.Normal(0.0, 1.0) if df is None else dist.StudentT(df, 0.0, 1.0)
    torch.testing.assert_close(base.log_prob(x), one.log_prob(x).sum(-1))
    assert base.event_shape == (4,) and base.batch_shape == ()
    torch.manual_seed(0)
    draws = base.rsample((200000,))
    assert draws.shape == (200000, 4) and draws.dtype == torch.float64
    # the draws have the distribution's quantiles (a wrong scale or df moves them)
    probs = torch.tensor([0.1, 0.25, 0.75, 0.9], dtype=torch.float64)
    want = {None: [-1.2816, -0.6745, 0.6745, 1.2816], 1.5: [-2.1964, -0.8726, 0.8726, 2.1964],
            10.0: [-1.3722, -0.6998, 0.6998, 1.3722]}[df]  # fmt: skip
    got = torch.quantile(draws[:, 0], probs)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=0.02, rtol=0)
    # Pyro's plates expand it; the expanded one scores with the same density
    wide = base.expand([2])
    assert wide.rsample((3,)).shape == (3, 2, 4)
    torch.testing.assert_close(wide.log_prob(x[:, :2]), base.log_prob(x[:, :2]))
    assert bool(torch.isnan(base.mean).all()) == (df is not None and df <= 1)
    assert base.variance[0].item() == (1.0 if df is None else df / (df - 2) if df > 2 else math.inf)


def test_base_follows_the_guide_dtype_and_the_df():
    guide = AutoFlowNormal(hierarchical, base_df=4.0)
    guide()
    assert guide.get_base_dist().df == 4.0 and guide.get_base_dist().dim == guide.latent_dim
    guide.double()
    draw = guide.get_posterior().rsample((2,))
    assert draw.dtype == torch.float64
    assert guide.get_base_dist().rsample().dtype == torch.float64
    guide.base_df = None  # a changed df is a new base, not a stale one
    assert guide.get_base_dist().df is None
