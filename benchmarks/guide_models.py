"""The posteriors of ``bench_guides.py``, shared with ``nuts_references.py``.

Every model is written so a leading particle dimension broadcasts
(``vectorize_particles=True``). ``MODELS`` maps a short name to
``(label, model)``; ``CLOSED_FORM`` gives exact reference draws where they
exist (so no MCMC is needed there).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

# ------------------------------------------------------------------ funnel
FUNNEL_SCALE, FUNNEL_X = 1.5, 9  # y ~ N(0, 1.5), nine x's: 10-D


def funnel():
    y = pyro.sample("y", dist.Normal(0.0, FUNNEL_SCALE))
    scale = (y / 2).exp().unsqueeze(-1).expand(*y.shape, FUNNEL_X)
    pyro.sample("x", dist.Normal(0.0, scale).to_event(1))


def funnel_draws(n: int, generator: torch.Generator) -> dict:
    y = FUNNEL_SCALE * torch.randn(n, generator=generator, dtype=torch.float64)
    x = (y / 2).exp()[:, None] * torch.randn(n, FUNNEL_X, generator=generator, dtype=torch.float64)
    return {"y": y, "x": x}


# ------------------------------------------------------------------ eight schools
SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools_centered():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


def eight_schools_noncentered():
    """The same posterior reparameterized (what NUTS samples without divergences)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.deterministic("theta", mu + tau * eta)
        pyro.sample("obs", dist.Normal(mu + tau * eta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


# ------------------------------------------------------------------ logistic regression
def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.tensor(data.target, dtype=torch.float32)


_BC = None


def logistic():
    global _BC
    if _BC is None:
        _BC = _breast_cancer()
    x, y = _BC
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        logits = (w * x).sum(-1) + b  # broadcasts over vectorized particles
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


# ------------------------------------------------------------------ banana
BANANA_SCALE, BANANA_BEND = 2.0, 0.25  # x0 ~ N(0, 2), x1 ~ N(0.25 x0^2, 1)


def banana():
    x0 = pyro.sample("x0", dist.Normal(0.0, BANANA_SCALE))
    pyro.sample("x1", dist.Normal(BANANA_BEND * x0**2, 1.0))


def banana_draws(n: int, generator: torch.Generator) -> dict:
    x0 = BANANA_SCALE * torch.randn(n, generator=generator, dtype=torch.float64)
    x1 = BANANA_BEND * x0**2 + torch.randn(n, generator=generator, dtype=torch.float64)
    return {"x0": x0, "x1": x1}


# ------------------------------------------------------------------ two modes
MODE = torch.tensor([1.25, 1.25, 0.0, 0.0])  # modes at +-MODE, unit covariance: 4-D


def two_modes():
    z = pyro.sample("z", dist.Normal(torch.zeros(4), 10.0).to_event(1))  # flat-ish prior
    mix = torch.stack([
        dist.Normal(MODE, 1.0).to_event(1).log_prob(z),
        dist.Normal(-MODE, 1.0).to_event(1).log_prob(z),
    ], -1).logsumexp(-1) - math.log(2)  # fmt: skip
    # target: the mixture (the prior's log density is taken back out)
    pyro.factor("mixture", mix - dist.Normal(torch.zeros(4), 10.0).to_event(1).log_prob(z))


def two_modes_draws(n: int, generator: torch.Generator) -> dict:
    sign = torch.randint(0, 2, (n, 1), generator=generator).double() * 2 - 1
    z = sign * MODE.double() + torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return {"z": z}


MODELS = {
    "funnel": ("funnel (10-D)", funnel),
    "schools": ("eight schools, centered (10-D)", eight_schools_centered),
    "logistic": ("logistic regression, breast cancer (31-D)", logistic),
    "banana": ("banana (2-D)", banana),
    "two_modes": ("two modes (4-D)", two_modes),
}

CLOSED_FORM = {"funnel": funnel_draws, "banana": banana_draws, "two_modes": two_modes_draws}
