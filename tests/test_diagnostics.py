"""ArviZ export shaped like az.from_pyro, and PSIS k-hat with its reading."""

from __future__ import annotations

import doctest
import logging
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_lunet import diagnostics, khat_reading, psis_khat, to_inference_data

logging.getLogger("pyro").setLevel(logging.WARNING)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ's refactor notice
    import arviz as az

Y = torch.tensor([[0.5, 1.2, -0.3, 2.0], [1.1, 0.4, 0.9, -0.2], [0.0, 0.8, 1.5, 0.3]])


def grouped(y=Y):
    """Scalar, plate and event-shaped latents; an observed site in two plates."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    pair = pyro.sample("pair", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("groups", 3, dim=-2):
        theta = pyro.sample("theta", dist.Normal(mu + pair.sum(), tau))
        with pyro.plate("obs_plate", 4, dim=-1):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


@pytest.fixture(scope="module")
def nuts_idata():
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(grouped), warmup_steps=5, num_samples=6, disable_progbar=True)
    mcmc.run()
    return az.from_pyro(mcmc, log_likelihood=False)


def _structure(dataset):
    return {name: (var.dims, var.shape[2:]) for name, var in dataset.data_vars.items()}


@pytest.mark.parametrize("vectorize", [True, False])
def test_posterior_is_shaped_like_from_pyro(nuts_idata, vectorize):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(grouped)
    idata = to_inference_data(grouped, guide, num_samples=40, num_chains=2, vectorize=vectorize)
    assert _structure(idata.posterior) == _structure(nuts_idata.posterior)
    assert dict(idata.posterior.sizes)["chain"] == 2 and dict(idata.posterior.sizes)["draw"] == 20
    assert set(idata.observed_data.data_vars) == set(nuts_idata.observed_data.data_vars)
    assert idata.observed_data["y"].dims == nuts_idata.observed_data["y"].dims
    assert (idata.observed_data["y"].values == Y.numpy()).all()
    # Side by side with NUTS in ArviZ's summaries and plots.
    summary = az.summary(idata, kind="stats")
    assert len(summary) == 1 + 1 + 2 + 3
    import matplotlib

    matplotlib.use("Agg")
    az.plot_forest([nuts_idata, idata], model_names=["NUTS", "guide"], var_names=["mu"])


def test_draws_follow_the_guide_in_constrained_space():
    def model():
        pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("m", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide():
        pyro.sample("s", dist.LogNormal(1.0, 0.5))
        pyro.sample("m", dist.Normal(torch.tensor([3.0, -1.0, 0.0]), 0.1).to_event(1))

    pyro.set_rng_seed(0)
    post = to_inference_data(model, guide, num_samples=4000).posterior
    assert post["m"].shape == (1, 4000, 3)
    assert float(post["m"].mean(("chain", "draw"))[0]) == pytest.approx(3.0, abs=0.01)
    assert float(post["s"].mean()) == pytest.approx(torch.tensor(1.125).exp().item(), rel=0.05)
    assert float(post["s"].min()) > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_chains"):
        to_inference_data(grouped, AutoNormal(grouped), num_samples=5, num_chains=2)
    with pytest.raises(ValueError, match="num_samples"):
        psis_khat(grouped, AutoNormal(grouped), num_samples=0)


def _target():
    pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 1.0).to_event(1))


@pytest.mark.parametrize("vectorize", [True, False])
def test_khat_reads_good_for_a_slightly_wide_guide(vectorize):
    def wide():  # bounded weights p/q
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 1.2).to_event(1))

    pyro.set_rng_seed(0)
    result = psis_khat(_target, wide, num_samples=1000 if vectorize else 300, vectorize=vectorize)
    assert result.khat < 0.5 and result.reading == "good"


def test_khat_of_the_exact_posterior():
    def exact():  # constant weights
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 1.0).to_event(1))

    assert psis_khat(_target, exact, num_samples=200) == (float("-inf"), "good")


def test_khat_flags_a_guide_too_narrow():
    def narrow():  # weights p/q have infinite variance: k = 1 - 0.2^2 = 0.96
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 0.2).to_event(1))

    pyro.set_rng_seed(0)
    result = psis_khat(_target, narrow, num_samples=2000)
    assert result.khat > 0.7 and result.reading == "do not trust"


def test_khat_is_a_float_carrying_its_reading():
    def wide():
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 1.2).to_event(1))

    pyro.set_rng_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = psis_khat(_target, wide, num_samples=500)
    assert not [w for w in caught if "vectorized" in str(w.message)]  # no needless fallback
    assert float(result) == result.khat < 0.5 and result < 0.5 and result.reading == "good"
    khat, reading = result  # as the (khat, reading) named tuple it used to be
    assert type(khat) is float and (khat, reading) == result and result != (khat, "usable")


def funnel():
    """Written for one draw: ``x``'s scale takes ``y``'s shape, so it cannot
    broadcast against a batch of draws."""
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(4), torch.exp(y / 2)).to_event(1))


@pytest.fixture
def funnel_guide():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(funnel)
    svi = SVI(funnel, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(5):
        svi.step()
    return guide


def test_khat_of_an_unvectorizable_model_falls_back_with_a_warning(funnel_guide):
    with pytest.warns(UserWarning, match="could not be vectorized.*slower"):
        result = psis_khat(funnel, funnel_guide, num_samples=300)
    assert math.isfinite(result) and result.reading == khat_reading(result)


def test_inference_data_of_an_unvectorizable_model_falls_back_with_a_warning(funnel_guide):
    with pytest.warns(UserWarning, match="could not be vectorized.*slower"):
        post = to_inference_data(funnel, funnel_guide, num_samples=40, num_chains=2).posterior
    assert post["y"].shape == (2, 20) and post["x"].shape == (2, 20, 4)
    assert post["x"].dims == ("chain", "draw", "x_dim_0")
    assert post["x"].std() > 0  # independent draws, not one repeated


def test_khat_readings():
    assert khat_reading(0.2) == "good"
    assert khat_reading(0.5) == khat_reading(0.69) == "usable"
    assert khat_reading(0.7) == khat_reading(float("inf")) == "do not trust"
    assert khat_reading(float("nan")) == "do not trust"
    assert khat_reading(float("-inf")) == "good"


def test_guide_modes_are_restored():
    pyro.clear_param_store()
    guide = AutoNormal(grouped)
    guide()
    guide.train()
    psis_khat(grouped, guide, num_samples=50)
    assert guide.training


def test_docstring_examples_run():
    from pyro_lunet import flows, training

    for module in (diagnostics, flows, training):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert tried > 0 and failures == 0, module.__name__
