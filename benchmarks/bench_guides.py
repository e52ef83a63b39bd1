"""Variational guides from pyro-lunet's builders against Pyro's autoguides.

Fits each guide on three standard posteriors and prints, per guide: the error
of the posterior means (|mean - ref| / ref sd, averaged over all latent
coordinates), of the standard deviations (|sd / ref sd - 1|, averaged), the
final ELBO (4000 particles), the PSIS k-hat (4000 draws) and the wall time
of the fit. References: closed form for the funnel, NUTS for the others.

    python benchmarks/bench_guides.py [--steps 1000] [--quick]

Models: Neal's funnel (scale 1.5, 5-D), eight schools (non-centered), and a
Bayesian logistic regression on scikit-learn's breast-cancer data
(standardized, 30 features + intercept, N(0, 1) priors).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)

from pyro_lunet import PenalizedELBO, activation_flow, coupling_flow, psis_khat, to_inference_data

logging.getLogger("pyro").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", category=FutureWarning)


# ------------------------------------------------------------------ models
def funnel():
    y = pyro.sample("y", dist.Normal(0.0, 1.5))
    scale = (y / 2).exp().unsqueeze(-1).expand(*y.shape, 4)
    pyro.sample("x", dist.Normal(0.0, scale).to_event(1))


FUNNEL_REF = {  # closed form: sd x = sqrt(E e^y) = e^{1.5^2 / 4}
    "y": (torch.tensor(0.0), torch.tensor(1.5)),
    "x": (torch.zeros(4), torch.full((4,), math.exp(1.5**2 / 4))),
}

SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.float32)

    def logistic():
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            logits = (w * x).sum(-1) + b  # broadcasts over vectorized particles
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    return logistic


def nuts_reference(model, warmup, samples, seed=0):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(NUTS(model, jit_compile=True, ignore_jit_warnings=True), warmup_steps=warmup,
                num_samples=samples, disable_progbar=True)  # fmt: skip
    start = time.perf_counter()
    mcmc.run()
    draws = mcmc.get_samples()
    ref = {k: (v.mean(0), v.std(0)) for k, v in draws.items()}
    return ref, time.perf_counter() - start


# ------------------------------------------------------------------ guides
GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoMultivariateNormal": lambda m: AutoMultivariateNormal(m),
    "AutoIAFNormal": lambda m: AutoIAFNormal(m, num_transforms=2),
    "coupling_flow(lu)": lambda m: AutoNormalizingFlow(m, partial(coupling_flow, num_blocks=2)),
    "coupling_flow(butterfly)": lambda m: AutoNormalizingFlow(
        m, partial(coupling_flow, num_blocks=2, layer="butterfly")
    ),
    "activation_flow(lu)": lambda m: AutoNormalizingFlow(m, partial(activation_flow, num_blocks=3)),
}


def fit(model, make_guide, steps, seed=0, particles=8, lr=1e-2):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(model)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)})
    elbo = PenalizedELBO(Trace_ELBO(num_particles=particles, vectorize_particles=True), optim)
    svi = SVI(model, guide, optim, elbo)
    start = time.perf_counter()
    for _ in range(steps):
        svi.step()
    return guide, time.perf_counter() - start


def evaluate(model, guide, ref):
    pyro.set_rng_seed(1)
    post = to_inference_data(model, guide, num_samples=4000).posterior
    mean_err, sd_err = [], []
    for name, (mean, sd) in ref.items():
        draws = torch.as_tensor(post[name].values).flatten(0, 1)
        mean_err.append(((draws.mean(0) - mean).abs() / sd).flatten())
        sd_err.append((draws.std(0) / sd - 1).abs().flatten())
    pyro.set_rng_seed(2)
    with torch.no_grad():
        elbo = -Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(model, guide)
    pyro.set_rng_seed(3)
    khat = psis_khat(model, guide, num_samples=4000)
    return torch.cat(mean_err).mean().item(), torch.cat(sd_err).mean().item(), elbo, khat


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="fewer NUTS draws and steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = 300 if args.quick else args.steps
    warm, draws = (100, 200) if args.quick else (300, 600)
    logistic = breast_cancer()
    problems = [("funnel (5-D)", funnel, FUNNEL_REF, "closed form")]
    for label, model in [("eight schools", eight_schools), ("logistic (31-D)", logistic)]:
        ref, secs = nuts_reference(model, warm, draws)
        problems.append((label, model, ref, f"NUTS {warm}+{draws}, {secs:.0f} s"))
    header = (
        f"{'guide':26s} {'mean err':>9s} {'sd err':>8s} {'ELBO':>10s} {'k-hat':>7s} {'fit s':>7s}"
    )
    for label, model, ref, source in problems:
        print(f"\n== {label}  (reference: {source}; {steps} steps, 8 particles)")
        print(header)
        for name, make in GUIDES.items():
            guide, secs = fit(model, make, steps)
            mean_err, sd_err, elbo, khat = evaluate(model, guide, ref)
            row = f"{mean_err:9.3f} {sd_err:8.3f} {elbo:10.3f} {khat.khat:7.2f} {secs:7.1f}"
            print(f"{name:26s} {row}", flush=True)


if __name__ == "__main__":
    main()
