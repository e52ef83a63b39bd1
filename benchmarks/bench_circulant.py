"""The CDFlow paper's two speed ratios for ``circulant_diagonal_linear``, in one run.

Feng & Liao (NeurIPS 2025) report the circulant-diagonal layer's inverse
1.17x and its log-determinant 4.31x faster than a dense matrix's at 96
channels. This script measures the same two ratios for this library's layer
against the dense LU layer ``lu_linear`` (its inverse is two triangular
solves, its log-determinant a sum over U's diagonal) and, for reference,
against a plain dense matrix (``torch.linalg.solve``/``slogdet``: the paper's
baseline), at D = 96 and D = 1024:

* ``inverse``: the layer's inverse map on a batch of B rows, under ``no_grad``
  (how a flow samples when the layer is trained for scoring, and vice versa);
* ``log-det``: ``log|det W|`` of the current parameters, with gradients on
  (as in training, where it cannot be cached).

Timings are interleaved (round robin) and the median of ``--repeats`` rounds
is reported; ratios are ``other / circulant`` (above 1: the circulant layer
is faster). Run ``python benchmarks/bench_circulant.py [--threads 1]``.
"""

from __future__ import annotations

import argparse

import torch

from pyro_lunet import circulant_diagonal_linear, lu_linear
from pyro_lunet.cli.bench import median_times


def _layers(dim: int, num_factors: int):
    torch.manual_seed(0)
    circulant = circulant_diagonal_linear(dim, num_factors=num_factors, init="orthogonal")
    lu = lu_linear(dim, init="orthogonal")  # role="guide": its inverse solves
    dense = torch.nn.Parameter(lu.weight().detach().clone())
    with torch.no_grad():  # away from the initial values, as after training
        for p in (*circulant.parameters(), *lu.parameters()):
            p.add_(0.01 * torch.randn_like(p))
    return circulant, lu, dense


def _measure_dim(dim, batch, num_factors, repeats, min_seconds):
    circulant, lu, dense = _layers(dim, num_factors)
    y = torch.randn(batch, dim)

    def inverse(layer):
        def fn():
            with torch.no_grad():
                layer.inv(y.clone())  # a fresh tensor: no cache answers

        return fn

    def dense_inverse():
        with torch.no_grad():
            torch.linalg.solve(dense, y.T)

    inverses = {"circulant": inverse(circulant), "lu_linear": inverse(lu), "dense": dense_inverse}
    log_dets = {
        "circulant": circulant.log_abs_det,
        "lu_linear": lu.log_abs_det,
        "dense": lambda: torch.linalg.slogdet(dense)[1],
    }
    return {
        "inverse": median_times(inverses, repeats, min_seconds),
        "log-det": median_times(log_dets, repeats, min_seconds),
    }


def run(dims, batch, num_factors, repeats, min_seconds):
    return [(dim, _measure_dim(dim, batch, num_factors, repeats, min_seconds)) for dim in dims]


def _print(rows, batch, num_factors):
    print(
        f"circulant_diagonal_linear(num_factors={num_factors}) vs lu_linear and a dense matrix; "
        f"inverse on B={batch} rows (no_grad), log-det with grad; float32, "
        f"{torch.get_num_threads()} thread(s)\n"
    )
    header = (
        f"{'D':>6s} {'task':>8s} {'circulant':>12s} {'lu_linear':>12s} {'dense':>12s}"
        f" {'vs lu_linear':>13s} {'vs dense':>10s}"
    )
    print(header)
    print("-" * len(header))
    for dim, times in rows:
        for task, t in times.items():
            print(
                f"{dim:6d} {task:>8s} {t['circulant'] * 1e6:10.1f}us {t['lu_linear'] * 1e6:10.1f}us"
                f" {t['dense'] * 1e6:10.1f}us {t['lu_linear'] / t['circulant']:12.2f}x"
                f" {t['dense'] / t['circulant']:9.2f}x"
            )
    print(
        "\nPaper (Feng & Liao 2025, 96 channels, vs a dense matrix): inverse 1.17x, log-det 4.31x."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[96, 1024])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--num-factors", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-seconds", type=float, default=0.02)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    rows = run(args.dims, args.batch, args.num_factors, args.repeats, args.min_seconds)
    _print(rows, args.batch, args.num_factors)
    return rows


if __name__ == "__main__":
    main()
