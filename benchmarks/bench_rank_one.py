"""Rank-one-updated layers (P4Inv): drift of A^-1 over many merges, and what a merge costs.

Two tables:

* Drift: ``--merges`` (10,000) merges of random rank-one updates into one
  layer at D = 64, in float32 and float64: without corrections, with a
  hyper-power refresh of A^-1 every 50 merges, and with that plus an exact
  ``slogdet`` of A (``RankOneScheduler``'s default). Each update
  is ``u = s g / sqrt(D) - r (A - I) v / |v|^2``, ``g ~ N(0, I)``, against
  the layer's own fresh ``v ~ N(0, I)``: with ``r = 0`` a random walk of A
  whose condition number grows (merges that would leave the log-determinant
  range are skipped), with ``r > 0`` a walk that keeps returning towards I
  (small steps, or large ones with a larger condition number). "large steps"
  is a stress test: its updates are as large as A - I itself, and in
  float32 a single such merge can move ``A A^-1`` by ~1e-3 (the
  Sherman-Morrison update's rounding, amplified by
  ``|A^-1 u| |v^T A^-1| / |1 + v^T A^-1 u|`` up to ~1e4); no correction
  schedule short of one per merge hides that, float64 does.
  Reported: the largest entry of ``A A^-1 - I`` (in float64 arithmetic) and
  the error of the stored ``log|det A|`` against ``slogdet``, each the worst
  over the last 100 merges (two correction periods), the condition number of
  the final A, the share of skipped merges and the scheduler's time per
  merge (corrections included).
* Cost: at D = 1024, B = 1024, float32, the time of a density-training step
  (``-log_prob(x).mean()`` and backward) and of a guide step (``rsample``,
  ``log_prob``, backward) against nflows ``LULinear``'s step, and the time of
  one merge and one correction against a training step. Interleaved rounds,
  medians.

Run ``python benchmarks/bench_rank_one.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import math
import time

import pyro.distributions as dist
import torch

from pyro_lunet import RankOneScheduler, rank_one_updated_linear
from pyro_lunet.cli.bench import median_times


# ------------------------------------------------------------------- drift
def drift(dim, merges, dtype, correct_every, recompute_every, scale, revert, seed=0):
    torch.manual_seed(seed)
    layer = rank_one_updated_linear(dim).to(dtype)
    scheduler = RankOneScheduler(layer, None, merge_every=1, force_every=None,
                                 correct_every=correct_every,
                                 recompute_log_det_every=recompute_every)  # fmt: skip
    eye = torch.eye(dim, dtype=dtype)
    eye64 = torch.eye(dim, dtype=torch.float64)
    skipped, seconds, worst = 0, 0.0, {"inverse": 0.0, "log_det": 0.0}
    for i in range(merges):
        with torch.no_grad():
            u = scale * torch.randn(dim, dtype=dtype) / math.sqrt(dim)
            if revert:  # shrink A - I along v: a stationary, well-conditioned walk
                v = layer.v
                u -= revert * (layer.A - eye) @ v / v.square().sum()
            layer.u.copy_(u)
        start = time.perf_counter()
        scheduler.step()
        seconds += time.perf_counter() - start
        skipped += bool(layer.u.abs().max() > 0)  # a skipped merge keeps u
        if i >= merges - WINDOW:
            # in float64, so that float32's error is the layer's own
            a = layer.A.double()
            inverse = (a @ layer.A_inv.double() - eye64).abs().max().item()
            log_det = (layer.log_abs_det_A.double() - torch.linalg.slogdet(a)[1]).abs().item()
            worst["inverse"] = max(worst["inverse"], inverse)
            worst["log_det"] = max(worst["log_det"], log_det)
    return {
        **worst,
        "cond": torch.linalg.cond(layer.A.double()).item(),
        "log_det_A": layer.log_abs_det_A.item(),
        "skipped": skipped / merges,
        "ms_per_merge": 1e3 * seconds / merges,
    }


WINDOW = 100  # the errors reported are the worst over the last WINDOW merges
SCHEDULES = [  # label, correct_every, recompute_log_det_every
    ("none", None, None),
    ("A^-1 every 50", 50, None),
    ("+ slogdet", 50, 50),  # the scheduler's default
]
PROCESSES = {  # name -> (scale, revert)
    "random walk": (0.01, 0.0),
    "mean-reverting": (0.05, 0.5),
    "large steps": (0.2, 0.9),
}


def drift_table(dim, merges):
    print(
        f"\nDrift over {merges} merges at D={dim}: the worst max|A A^-1 - I| and "
        f"|log|det A| - slogdet(A)| over the last {WINDOW} merges"
    )
    header = (
        f"{'dtype':8s}{'process':>16s}{'correction':>18s}{'A A^-1 - I':>13s}"
        f"{'log-det err':>13s}{'cond(A)':>10s}{'log|det A|':>12s}{'skipped':>9s}{'ms/merge':>10s}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for dtype in (torch.float32, torch.float64):
        for process, (scale, revert) in PROCESSES.items():
            for label, every, recompute in SCHEDULES:
                r = drift(dim, merges, dtype, every, recompute, scale, revert)
                rows.append((dtype, process, label, r))
                print(
                    f"{str(dtype).split('.')[-1]:8s}{process:>16s}{label:>18s}"
                    f"{r['inverse']:13.2e}{r['log_det']:13.2e}{r['cond']:10.1f}"
                    f"{r['log_det_A']:12.2f}{r['skipped']:9.1%}{r['ms_per_merge']:10.3f}"
                )
    return rows


# -------------------------------------------------------------------- cost
CORRECT = "correct_ + slogdet (every 50 merges)"


def cost_table(dim, batch, repeats, min_seconds):
    torch.manual_seed(0)
    layer = rank_one_updated_linear(dim)
    with torch.no_grad():
        layer.u.normal_(0, 0.1 / math.sqrt(dim))
    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    flow = dist.TransformedDistribution(base, [layer])
    data = [torch.randn(batch, dim) for _ in range(2)]
    counter = {"i": 0}

    def next_data():
        counter["i"] += 1
        return data[counter["i"] % 2]

    def backward(loss, params):
        for p in params:
            p.grad = None
        loss.backward()

    params = list(layer.parameters())

    def density():
        backward(-flow.log_prob(next_data()).mean(), params)

    def guide():
        y = flow.rsample((batch,))
        backward((flow.log_prob(y) + 0.5 * y.square().sum(-1)).mean(), params)

    def merge():
        layer.merge_(force=True)
        with torch.no_grad():
            layer.u.normal_(0, 0.1 / math.sqrt(dim))  # O(D), so that the next merge has work

    def correct():  # as the scheduler runs it by default
        layer.correct_(recompute_log_det=True)

    fns = {"rank-one density step": density, "rank-one guide step": guide}
    try:
        from nflows.transforms import LULinear

        lu = LULinear(dim, identity_init=True)
        lu_params = list(lu.parameters())

        def nflows_density():
            z, ladj = lu(next_data())
            backward(0.5 * z.square().sum(-1).mean() - ladj.mean(), lu_params)

        fns["nflows LULinear density step"] = nflows_density
    except ImportError:
        pass
    fns["merge (O(D^2))"] = merge
    fns[CORRECT] = correct
    x, w = torch.randn(batch, dim), torch.randn(dim, dim)
    fns["one B x D x D GEMM"] = lambda: x @ w.T
    times = median_times(fns, repeats, min_seconds)
    step = times["rank-one density step"]
    nflows = times.get("nflows LULinear density step")
    print(f"\nCost at D={dim}, B={batch}, float32, {torch.get_num_threads()} thread(s)")
    header = f"{'operation':40s}{'ms':>10s}{'x our step':>12s}{'x nflows step':>15s}"
    print(header)
    print("-" * len(header))
    for name, t in times.items():
        vs_nflows = f"{t / nflows:15.3f}" if nflows else f"{'n/a':>15s}"
        print(f"{name:40s}{t * 1e3:10.3f}{t / step:12.3f}{vs_nflows}")
    per_step = times["merge (O(D^2))"] / 10 + times[CORRECT] / 500
    print(
        f"scheduler overhead per step at the defaults (a merge every 10 steps, a correction "
        f"every 50 merges): {per_step * 1e3:.3f} ms = {per_step / step:.1%} of a density step"
    )
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=64, help="drift table's D")
    parser.add_argument("--merges", type=int, default=10_000)
    parser.add_argument("--cost-dim", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.1)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (1 under contention)")
    parser.add_argument("--skip-drift", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.merges, args.cost_dim, args.batch, args.repeats = 500, 128, 128, 2
        args.min_seconds = 0.01
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    if not args.skip_drift:
        drift_table(args.dim, args.merges)
    if not args.skip_cost:
        cost_table(args.cost_dim, args.batch, args.repeats, args.min_seconds)


if __name__ == "__main__":
    main()
