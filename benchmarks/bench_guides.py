"""Variational guides on five posteriors: Pyro's autoguides against ``AutoFlowNormal``, in one run.

For every model and guide: fit with the same protocol (``--steps`` SVI steps,
``ClippedAdam(lr=5e-3)`` decayed by ``0.9995`` per step at 4000 steps, i.e.
to the same final rate at any step count, ``Trace_ELBO(num_particles=4,
vectorize_particles=True)``), then from 4000 guide draws report

* mean err: max over latent coordinates of ``|mean - ref mean| / ref sd``;
* sd err: max over coordinates of ``|sd / ref sd - 1|``;
* k-hat: the PSIS Pareto k-hat (``pyro_lunet.psis_khat``; < 0.5 good, > 0.7 do not trust);
* fit s: the wall time of the fit (one thread).

References (``benchmarks/references/*.json``, written by
``benchmarks/nuts_references.py``): exact draws for the funnel, banana and
two modes, NUTS for eight schools and the logistic regression. The guides:
``AutoNormal``, ``AutoMultivariateNormal``, ``AutoIAFNormal`` and
``AutoBNAFNormal`` (Pyro 1.9 has none: NumPyro's, written as
``AutoNormalizingFlow(model, block_autoregressive)``) at Pyro's defaults, and
``AutoFlowNormal`` at its defaults with each family. At the end, the issue's targets for
``AutoFlowNormal`` with its default family (``lu``) against ``AutoIAFNormal``.

    python benchmarks/bench_guides.py            # full: 5 models, 4000 steps
    python benchmarks/bench_guides.py --quick    # 2 models, 300 steps: a couple of minutes
    python benchmarks/bench_guides.py --jobs 2   # models in 2 processes (one thread each)
    python benchmarks/bench_guides.py --seeds 0 1 2   # and the medians over seeds
    python benchmarks/bench_guides.py --step-cost     # CPU time per step, against AutoIAFNormal
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
import warnings
from pathlib import Path

import pyro
import torch
from guide_models import MODELS
from pyro.distributions.transforms import block_autoregressive
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)

from pyro_lunet import AutoFlowNormal, families, psis_khat, to_inference_data

logging.getLogger("pyro").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="the model and guide could not be vectorized")

REFERENCES = Path(__file__).resolve().parent / "references"


def AutoBNAFNormal(model):  # noqa: N802 (numpyro's name; Pyro 1.9 has no such class)
    """A block neural autoregressive flow guide, NumPyro's ``AutoBNAFNormal`` in Pyro:
    one :func:`~pyro.distributions.transforms.block_autoregressive` at its defaults."""
    return AutoNormalizingFlow(model, block_autoregressive)


GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoIAFNormal": AutoIAFNormal,
    "AutoBNAFNormal": AutoBNAFNormal,
    **{
        f"AutoFlowNormal({name})": (lambda m, n=name: AutoFlowNormal(m, layer=n))
        for name in families()
    },  # fmt: skip
}
TARGET_KHAT = {"funnel": 0.4, "schools": 0.5, "logistic": 0.3}


def load_reference(name: str) -> tuple[dict, str]:
    path = REFERENCES / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run benchmarks/nuts_references.py first")
    record = json.loads(path.read_text())
    ref = {
        site: (
            torch.tensor(v["mean"]).reshape(v["shape"]),
            torch.tensor(v["sd"]).reshape(v["shape"]),
        )
        for site, v in record["sites"].items()
    }
    return ref, record["source"]


def fit(model, make_guide, steps: int, seed: int = 0, particles: int = 4, lr: float = 5e-3):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(model)
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.9995 ** (4000 / steps)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=particles, vectorize_particles=True))
    start = time.perf_counter()
    for _ in range(steps):
        svi.step()
    return guide, time.perf_counter() - start


def evaluate(model, guide, ref, draws: int = 4000) -> tuple[float, float, float]:
    """(max |mean error| in ref sds, max |sd ratio - 1|, PSIS k-hat)."""
    pyro.set_rng_seed(1)
    post = to_inference_data(model, guide, num_samples=draws).posterior
    mean_err, sd_err = [], []
    for name, (mean, sd) in ref.items():
        if name not in post:
            continue
        values = torch.as_tensor(post[name].values, dtype=torch.float64).flatten(0, 1)
        mean_err.append(((values.mean(0) - mean) / sd).abs().flatten())
        sd_err.append((values.std(0) / sd - 1).abs().flatten())
    pyro.set_rng_seed(2)
    khat = float(psis_khat(model, guide, num_samples=draws))
    return torch.cat(mean_err).max().item(), torch.cat(sd_err).max().item(), khat


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                     if ln.startswith("Model name"))  # fmt: skip
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    threads = torch.get_num_threads()
    return f"{model}; torch {torch.__version__}, pyro {pyro.__version__}, {threads} thread(s)"


def run_model(key: str, guides, steps: int, seed: int = 0) -> tuple[dict, str]:
    """Every guide on one model: ``({(model, guide): cells}, the printed table)``."""
    torch.set_num_threads(1)
    label, model = MODELS[key]
    ref, source = load_reference(key)
    header = f"{'guide':32s} {'mean err':>9s} {'sd err':>8s} {'k-hat':>7s} {'fit s':>7s}"
    lines = [f"\n== {label}  (reference: {source}; {steps} steps, 4 particles)", header]
    results = {}
    for name in guides:
        try:
            guide, secs = fit(model, GUIDES[name], steps, seed)
            cells = (*evaluate(model, guide, ref), secs)
        except Exception as error:  # a failing guide is a row, not the end of the run
            reason = (str(error).splitlines() or [""])[0][:120]
            lines.append(f"{name:32s} failed: {type(error).__name__}: {reason}")
            continue
        results[key, name] = cells
        lines.append(f"{name:32s} {cells[0]:9.3f} {cells[1]:8.3f} {cells[2]:7.2f} {cells[3]:7.1f}")
    return results, "\n".join(lines)


def run(models, guides, steps: int, seed: int = 0, jobs: int = 1) -> dict:
    """All models; with ``jobs > 1`` the models run in that many worker processes (one
    thread each; every guide of a model runs in the same process, so its times compare)."""
    results = {}
    if jobs <= 1:
        for key in models:
            part, table = run_model(key, guides, steps, seed)
            print(table, flush=True)
            results.update(part)
        return results
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_model, key, guides, steps, seed) for key in models]
        for future in futures:
            part, table = future.result()
            print(table, flush=True)
            results.update(part)
    return results


def check_targets(results: dict, models) -> None:
    ours, theirs = "AutoFlowNormal(lu)", "AutoIAFNormal"
    print(f"\n== targets: {ours} against {theirs}")
    for key in models:
        if (key, ours) not in results or (key, theirs) not in results:
            continue
        (m, _, k, t), (m0, _, k0, t0) = results[key, ours], results[key, theirs]
        checks = [f"k-hat {k:.2f} < {k0:.2f}: {'ok' if k < k0 else 'MISS'}",
                  f"mean err {m:.3f} <= {m0:.3f}: {'ok' if m <= m0 else 'MISS'}",
                  f"time {t:.0f} s <= {t0:.0f} s: {'ok' if t <= t0 else 'MISS'}"]  # fmt: skip
        if key in TARGET_KHAT:
            bound = TARGET_KHAT[key]
            checks.append(f"k-hat < {bound}: {'ok' if k < bound else 'MISS'}")
        print(f"{key:10s} " + "; ".join(checks))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 models, 300 steps")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default 4000)")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), default=None)
    parser.add_argument("--guides", nargs="*", choices=list(GUIDES), default=None)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0],
        help="seeds to run (k-hat moves by 0.1-0.3 between seeds); with several, the "
        "targets are checked on the medians over seeds",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="models run in parallel processes")
    parser.add_argument(
        "--step-cost", action="store_true",
        help="only the CPU time per SVI step of each guide, interleaved (no fits)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = args.steps or (300 if args.quick else 4000)
    models = args.models or (["funnel", "banana"] if args.quick else list(MODELS))
    guides = args.guides or list(GUIDES)
    print(f"machine: {machine()}")
    if args.step_cost:
        step_costs(models, guides)
        return
    per_seed = []
    for seed in args.seeds:
        print(f"\n######## seed {seed}")
        per_seed.append(run(models, guides, steps, seed, args.jobs))
    results = per_seed[0] if len(per_seed) == 1 else medians(per_seed, models, guides)
    check_targets(results, models)


def step_costs(models, guides, rounds: int = 7, steps: int = 40) -> None:
    """Process CPU time per SVI step of every guide on every model (the protocol's optimizer
    and ELBO), median of ``rounds`` interleaved rounds of ``steps`` steps, and its ratio to
    ``AutoIAFNormal``'s: a steadier figure than the fits' wall times on a shared machine."""
    for key in models:
        _, model = MODELS[key]
        runs = {}
        for name in guides:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            guide = GUIDES[name](model)
            optim = pyro.optim.ClippedAdam({"lr": 5e-3, "lrd": 0.9995})
            elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
            svi = SVI(model, guide, optim, elbo)
            for _ in range(20):  # set-up and warm-up
                svi.step()
            tensors = sum(1 for _ in guide.parameters())
            runs[name] = (svi, tensors, [])
        for _ in range(rounds):
            for svi, _, times in runs.values():
                start = time.process_time()
                for _ in range(steps):
                    svi.step()
                times.append((time.process_time() - start) / steps * 1e3)
        base = runs.get("AutoIAFNormal")
        base_ms = sorted(base[2])[rounds // 2] if base else None
        print(f"\n== {MODELS[key][0]}: CPU ms per SVI step (median of {rounds} rounds)")
        for name, (_, tensors, times) in runs.items():
            ms = sorted(times)[rounds // 2]
            ratio = f"{ms / base_ms:5.2f}x" if base_ms else ""
            print(f"{name:32s} {ms:6.2f} ms  {ratio}  ({tensors} parameter tensors)")


def medians(per_seed: list[dict], models, guides) -> dict:
    """Every cell's median over the seeds (a guide that failed on a seed is left out
    there), printed as one table per model."""
    results = {}
    for key in models:
        print(f"\n== {MODELS[key][0]}: medians over {len(per_seed)} seeds")
        print(f"{'guide':32s} {'mean err':>9s} {'sd err':>8s} {'k-hat':>7s} {'fit s':>7s}")
        for name in guides:
            runs = torch.tensor([r[key, name] for r in per_seed if (key, name) in r])
            if not len(runs):
                continue
            cells = tuple(runs.median(0).values.tolist())
            results[key, name] = cells
            khats = ", ".join(f"{k:.2f}" for k in runs[:, 2].tolist())
            print(f"{name:32s} {cells[0]:9.3f} {cells[1]:8.3f} {cells[2]:7.2f} {cells[3]:7.1f}"
                  f"   k-hats {khats}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
