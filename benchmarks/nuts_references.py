"""Writes the reference posteriors of ``bench_guides.py`` to ``benchmarks/references/``.

One JSON file per model: per latent site its mean and sd (from all draws) and
up to ``--keep`` draws (thinned), plus how they were made. Exact draws where
the posterior can be sampled directly (funnel, banana, two modes), NUTS
otherwise: eight schools is sampled *non-centered* (the same posterior
without the funnel geometry that makes NUTS diverge on the centered form)
and its ``theta`` recovered as ``mu + tau * eta``.

    python benchmarks/nuts_references.py [--only schools logistic] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch
from guide_models import CLOSED_FORM, MODELS, eight_schools_noncentered
from pyro.infer import MCMC, NUTS

OUT = Path(__file__).resolve().parent / "references"


def nuts(model, warmup: int, draws: int, seed: int, keep_sites) -> tuple[dict, str]:
    pyro.set_rng_seed(seed)
    kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True, target_accept_prob=0.9)
    mcmc = MCMC(kernel, warmup_steps=warmup, num_samples=draws, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    samples = mcmc.get_samples()
    if model is eight_schools_noncentered:
        samples["theta"] = samples["mu"][:, None] + samples["tau"][:, None] * samples["eta"]
    divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    source = f"NUTS {warmup} warm-up + {draws} draws, {divergences} divergences, {seconds:.0f} s"
    return {k: samples[k].double() for k in keep_sites}, source


def write(name: str, draws: dict, source: str, keep: int) -> Path:
    n = next(iter(draws.values())).shape[0]
    step = max(1, n // keep)
    record = {
        "model": name,
        "source": source,
        "num_draws": n,
        "sites": {
            site: {
                "mean": value.mean(0).tolist(),
                "sd": value.std(0).tolist(),
                "draws": [
                    [round(v, 4) for v in row]
                    for row in value[::step][:keep]
                    .reshape(min(keep, len(value[::step])), -1)
                    .tolist()
                ],
                "shape": list(value.shape[1:]),
            }
            for site, value in draws.items()
        },
    }
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="short chains (a smoke run)")
    parser.add_argument("--keep", type=int, default=1000, help="draws stored per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warmup, draws = (200, 400) if args.quick else (1000, 10000)
    for name in args.only:
        if name in CLOSED_FORM:
            n = 1_000_000
            samples = CLOSED_FORM[name](n, torch.Generator().manual_seed(0))
            source = f"exact draws ({n})"
        elif name == "schools":
            sites = ("mu", "tau", "theta")
            samples, source = nuts(eight_schools_noncentered, warmup, draws, 0, sites)
        else:
            samples, source = nuts(MODELS[name][1], warmup, draws // 2, 0, ("w", "b"))  # cheap ESS
        print(f"{name}: {source} -> {write(name, samples, source, args.keep)}", flush=True)


if __name__ == "__main__":
    main()
