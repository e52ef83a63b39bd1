"""Butterfly layers: grouped products against level-by-level and against nflows' dense LU.

For D in ``--dims`` and a batch of B (float32), times, interleaved round robin
(median of ``--repeats`` rounds):

* ``density``: a density-model training step, ``-TransformedDistribution.log_prob``
  of a data batch then backward (for nflows ``LULinear``: its data-to-noise
  ``forward`` and the same loss);
* ``guide``: ``rsample`` of B draws, their ``log q``, backward;
* ``score`` / ``sample``: the two directions under ``no_grad``;

for ``ButterflyLinear`` at several ``block_levels`` (levels per dense block),
the same layer applied one level at a time (reshape + elementwise ops per
level, the straightforward implementation) and nflows' ``LULinear``. Then
prints the speed-ups over nflows, the growth of each row's density step from
the smallest to the largest D, and parameter counts.

Run ``python benchmarks/bench_butterfly.py`` (``--quick`` for a smoke run).
On a shared machine, ``--threads 1 --cpu-time`` times the process's CPU
time, which other processes disturb far less than the wall clock.
"""

from __future__ import annotations

import argparse
import time

import torch

from pyro_lunet import ButterflyLinear, InvertibleLinear, lu_linear
from pyro_lunet.cli.bench import TASKS, PyroRunner, median_times, peer_runners, task_fn


class LevelByLevel(ButterflyLinear):
    """The same map, one level at a time: a full pass over the batch per level."""

    def _levels(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        plan = self._plan
        n, dim = x.shape
        x = torch.nn.functional.pad(x, (0, plan.padded - dim))
        grid = self._grid(inverse)
        low = plan.padded.bit_length() - 1 - self.num_levels
        rows = range(self.num_levels)
        for r in reversed(rows) if inverse else rows:
            stride = 1 << (low + r)
            e = grid[r].view(plan.padded // (2 * stride), 1, stride, 4)
            pairs = x.view(n, plan.padded // (2 * stride), 2, stride).transpose(0, 1)
            x0, x1 = pairs[:, :, 0], pairs[:, :, 1]
            y0 = e[..., 0] * x0 + e[..., 1] * x1
            y1 = e[..., 2] * x0 + e[..., 3] * x1
            x = torch.stack((y0, y1), 2).transpose(0, 1).reshape(n, plan.padded)
        return x[:, :dim]

    def _matvec(self, x):
        return self._levels(x, inverse=False)

    def _solve(self, y):
        return self._levels(y, inverse=True)

    # The base class's transforms, through the hooks above.
    _call = InvertibleLinear._call
    _inverse = InvertibleLinear._inverse


def _ours(dim: int, block_levels_list) -> dict[str, torch.nn.Module]:
    rows = {
        f"butterfly[block_levels={k}]": ButterflyLinear(dim, block_levels=k, init="orthogonal")
        for k in block_levels_list
    }
    rows["butterfly level-by-level"] = LevelByLevel(dim, init="orthogonal")
    return rows


def _task_fns(runner, inputs):
    """The four tasks of the shared harness for one runner."""
    return {task: task_fn(runner, task, inputs) for task in TASKS}


def run(dims, batch, repeats, min_seconds, block_levels_list, clock=time.perf_counter):
    fns, params, rows = {}, {}, []
    for dim in dims:
        torch.manual_seed(0)
        inputs = [torch.randn(batch, dim) for _ in range(2)]
        for name, module in _ours(dim, block_levels_list).items():
            for task, fn in _task_fns(PyroRunner(name, module, dim), inputs).items():
                fns[(dim, name, task)] = fn
            params[(dim, name)] = sum(p.numel() for p in module.parameters())
            if name not in rows:
                rows.append(name)
        (nflows,) = [r for r in peer_runners(dim) if r.name == "nflows"]
        for task, fn in _task_fns(nflows, inputs).items():
            fns[(dim, "nflows LULinear", task)] = fn
        params[(dim, "nflows LULinear")] = sum(p.numel() for p in nflows.parameters())
    rows.append("nflows LULinear")
    # Interleave everything, so a busy machine slows all rows alike.
    times = median_times(fns, repeats, min_seconds, clock)
    for dim in dims:
        dense = sum(p.numel() for p in lu_linear(dim).parameters())
        print(f"\nD={dim}, B={batch}, float32: ms (speed-up over nflows LULinear on the same task)")
        print(
            f"{'layer':32s}"
            + "".join(f"{t:>20s}" for t in TASKS)
            + f"{'params':>10s}{'% dense':>9s}"
        )
        for name in rows:
            cells = []
            for task in TASKS:
                t = times[(dim, name, task)]
                ref = times[(dim, "nflows LULinear", task)]
                cells.append(f"{t * 1e3:9.2f} ({ref / t:5.1f}x)")
            count = params[(dim, name)]
            print(
                f"{name:32s}"
                + "".join(f"{c:>20s}" for c in cells)
                + f"{count:>10d}{100 * count / dense:>8.2f}%"
            )
    if len(dims) > 1:
        lo, hi = min(dims), max(dims)
        print(f"\nGrowth of each step from D={lo} to D={hi} (time at {hi} / time at {lo}):")
        for name in rows:
            cells = [
                f"{task} {times[(hi, name, task)] / times[(lo, name, task)]:5.2f}x"
                for task in TASKS
            ]
            print(f"  {name:32s}" + "   ".join(cells))
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.05)
    parser.add_argument("--block-levels", type=int, nargs="+", default=[3, 4, 5, 6])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--cpu-time", action="store_true", help="time CPU time, not wall time")
    parser.add_argument("--quick", action="store_true", help="small dims, few repeats")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.dims, args.batch, args.repeats, args.min_seconds = [16, 100], 64, 2, 0.005
    torch.set_default_dtype(torch.float32)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock.__name__}")
    run(args.dims, args.batch, args.repeats, args.min_seconds, args.block_levels, clock)


if __name__ == "__main__":
    main()
