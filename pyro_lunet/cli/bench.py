"""Speed of pyro-lunet's layers against the layers users would pick instead, in one run.

For each dimension D and batch B (float32) every implementation is timed on
four tasks, each the way a user would run it:

* ``density``: a density-model training step, ``-log p(x)`` of a data batch
  (``TransformedDistribution.log_prob`` for Pyro transforms), then backward;
* ``guide``: a variational-guide step, ``rsample`` of B draws, their
  ``log q`` and a standard-normal target's ``log p``, then backward;
* ``sample`` and ``score``: the same two directions under ``no_grad``.

Peers: nflows ``LULinear``, zuko ``LULinearTransform``, normflows
``LULinearPermute`` and Pyro's ``GeneralizedChannelPermute`` (on ``(D, 1, 1)``
inputs), all with their default settings, plus two references: one dense
``B x D x D`` GEMM, and a row with no layer at all, Pyro's base distribution
alone (what every Pyro row's step spends around its layer: the floor under
it). Each training step is also counted in elementwise passes over the
batch. Measurements are interleaved across
implementations (round robin) and the median of ``--repeats`` rounds is
reported, so a noisy machine slows everyone alike. Ratios are against nflows
(the most used peer). The project's speed targets are not part of the
package: ``benchmarks/bench_layers.py`` runs this harness and checks them
(``benchmarks/targets.py``).

Run ``pyro-lunet bench`` (``--quick`` for a smoke run), or
``python benchmarks/bench_layers.py`` to check the targets too. The peers are
optional: install them with ``pip install "pyro-lunet[bench]"``; a peer that
is not installed is left out of the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import pyro.distributions as dist
import torch

from .. import __version__
from ..training import penalty
from ..transforms import FAMILIES

# -------------------------------------------------------------------- ours


def our_rows() -> dict[str, Callable[[int], torch.nn.Module]]:
    """Row name -> factory ``D -> TransformModule``, one per registered family and role.

    A family whose role changes the layer (``directional``) gets a row per
    role, ``name[role=guide]`` and ``name[role=density]``; the others one row.
    """
    rows: dict[str, Callable[[int], torch.nn.Module]] = {}
    for name, family in FAMILIES.items():
        if family.directional:
            for role in ("guide", "density"):
                rows[f"{name}[role={role}]"] = partial(family.factory, role=role)
        else:
            rows[name] = family.factory
    return rows


#: The rows of the registered families at import (``our_rows()`` reads the registry anew).
OURS: dict[str, Callable[[int], torch.nn.Module]] = our_rows()


TASKS = ("density", "guide", "sample", "score")


# ---------------------------------------------------------------- adapters
class Runner:
    """One implementation: its scoring map (data to noise) and sampling map."""

    name: str
    module: torch.nn.Module

    def score(self, x):  # -> (z, log|det dz/dx|)
        raise NotImplementedError

    def sample(self, eps):  # -> (y, log|det dy/deps|)
        raise NotImplementedError

    def parameters(self):
        return self.module.parameters()


def _normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * math.log(2 * math.pi))


class PyroRunner(Runner):
    """A Pyro transform, used through ``TransformedDistribution``."""

    def __init__(self, name, module, dim):
        self.name, self.module = name, module
        base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
        self.flow = dist.TransformedDistribution(base, [module])
        # Layers with a penalty get it in the loss, as PenalizedELBO adds it
        # (no family needs it; read right after a forward it costs nothing).
        self.penalized = any(callable(getattr(m, "penalty", None)) for m in module.modules())

    def _penalty(self):
        return penalty(self.module) if self.penalized else 0.0

    def density_loss(self, x):
        return -self.flow.log_prob(x).mean() + self._penalty()

    def guide_loss(self, batch):
        y = self.flow.rsample((batch,))
        return (self.flow.log_prob(y) - _normal_log_prob(y)).mean() + self._penalty()

    def no_grad_sample(self, batch):
        return self.flow.sample((batch,))

    def no_grad_score(self, x):
        return self.flow.log_prob(x)


class PairRunner(Runner):
    """A peer exposing ``score``/``sample`` maps that return ``(output, logdet)``."""

    def __init__(self, name, module, score, sample):
        self.name, self.module = name, module
        self.score, self.sample = score, sample

    def density_loss(self, x):
        z, ladj = self.score(x)
        return -(_normal_log_prob(z) + ladj).mean()

    def guide_loss(self, batch):
        eps = torch.randn(batch, self.dim)
        y, ladj = self.sample(eps)
        return (_normal_log_prob(eps) - ladj - _normal_log_prob(y)).mean()

    def no_grad_sample(self, batch):
        return self.sample(torch.randn(batch, self.dim))[0]

    def no_grad_score(self, x):
        z, ladj = self.score(x)
        return _normal_log_prob(z) + ladj


BASE_ONLY = "no layer: Pyro's base alone"


class BaseOnlyRunner(Runner):
    """No layer: what a Pyro row's step costs around its layer, the floor under every one.

    Its steps are a Pyro row's without the transform: the base's ``rsample``
    and ``log_prob`` (argument validation included) and, in the density
    step, their backward into the data, which a layer would pass on.
    """

    name = BASE_ONLY

    def __init__(self, dim):
        self.module = torch.nn.Module()
        self.base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)

    def density_loss(self, x):
        return -self.base.log_prob(x.detach().requires_grad_()).mean()

    def guide_loss(self, batch):
        y = self.base.rsample((batch,)).requires_grad_()
        return (self.base.log_prob(y.detach()) - _normal_log_prob(y)).mean()

    def no_grad_sample(self, batch):
        return self.base.sample((batch,))

    def no_grad_score(self, x):
        return self.base.log_prob(x)


def peer_runners(dim: int) -> list[Runner]:
    runners: list[Runner] = []
    try:
        from nflows.transforms import LULinear as NflowsLU

        m = NflowsLU(dim, identity_init=True)
        # nflows maps data to noise in forward().
        runners.append(PairRunner("nflows", m, m.forward, m.inverse))
    except ImportError:
        pass
    try:
        from zuko.transforms import LULinearTransform

        lu = torch.nn.Parameter(torch.eye(dim) + 0.01 * torch.randn(dim, dim))
        holder = torch.nn.ParameterList([lu])

        def zuko_score(x, lu=lu):
            t = LULinearTransform(lu)  # zuko builds its transforms per call
            z = t(x)
            return z, t.log_abs_det_jacobian(x, z)

        def zuko_sample(eps, lu=lu):
            t = LULinearTransform(lu)
            y = t.inv(eps)
            return y, -t.log_abs_det_jacobian(y, eps)

        runners.append(PairRunner("zuko", holder, zuko_score, zuko_sample))
    except ImportError:
        pass
    try:
        import normflows

        m = normflows.flows.LULinearPermute(dim)

        # normflows maps noise to data in forward().
        runners.append(PairRunner("normflows", m, m.inverse, m.forward))
    except ImportError:
        pass
    from pyro.distributions.transforms import GeneralizedChannelPermute

    gcp = GeneralizedChannelPermute(channels=dim)

    def gcp_score(x):
        z = gcp._inverse(x.reshape(-1, dim, 1, 1))
        return z.reshape(-1, dim), -gcp.log_abs_det_jacobian(z, x.reshape(-1, dim, 1, 1))

    def gcp_sample(eps):
        e = eps.reshape(-1, dim, 1, 1)
        y = gcp._call(e)
        return y.reshape(-1, dim), gcp.log_abs_det_jacobian(e, y)

    runners.append(PairRunner("pyro GeneralizedChannelPermute", gcp, gcp_score, gcp_sample))
    for r in runners:
        r.dim = dim
    return runners


PEERS = ("nflows", "zuko", "normflows", "pyro GeneralizedChannelPermute")


# ------------------------------------------------------------------ timing
def median_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    min_seconds: float,
    clock: Callable[[], float] = time.perf_counter,
    slow_seconds: float | None = None,
) -> dict[str, float]:
    """Seconds per call of each function: the median of ``repeats`` rounds.

    Rounds go round robin over the functions, so a noisy machine slows every
    one alike; within a round each function loops long enough to take about
    ``min_seconds``. A function whose single call takes over ``slow_seconds``
    is timed once (a pathological peer would otherwise stall the run).
    """
    loops, samples = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm up
        start = clock()
        fn()
        once = clock() - start
        if slow_seconds is not None and once > slow_seconds:
            samples[name].append(once)
        else:
            loops[name] = max(1, math.ceil(min_seconds / max(once, 1e-7)))
    for _ in range(repeats):
        for name, loop in loops.items():
            fn = fns[name]
            start = clock()
            for _ in range(loop):
                fn()
            samples[name].append((clock() - start) / loop)
    return {name: statistics.median(s) for name, s in samples.items()}


def task_fn(runner: Runner, task: str, inputs: list[torch.Tensor]) -> Callable[[], None]:
    batch = inputs[0].shape[0]
    state = {"i": 0}

    def next_input():  # alternate inputs: no cache may answer a timed call
        state["i"] += 1
        return inputs[state["i"] % len(inputs)]

    params = [p for p in runner.parameters() if p.requires_grad]

    def step(loss):
        for p in params:
            p.grad = None
        loss.backward()

    if task == "density":
        return lambda: step(runner.density_loss(next_input()))
    if task == "guide":
        return lambda: step(runner.guide_loss(batch))
    if task == "sample":

        def sample():
            with torch.no_grad():
                runner.no_grad_sample(batch)

        return sample
    if task == "score":

        def score():
            with torch.no_grad():
                runner.no_grad_score(next_input())

        return score
    raise ValueError(task)


# A call slower than this is timed once, not repeated.
SLOW_SECONDS = 1.0


def _gemm_reference(dim: int, batch: int, repeats: int, min_seconds: float) -> float:
    x, w = torch.randn(batch, dim), torch.randn(dim, dim)
    return median_times({"gemm": lambda: x @ w.T}, repeats, min_seconds)["gemm"]


def _pass_reference(dim: int, batch: int, repeats: int, min_seconds: float) -> float:
    """Seconds of one elementwise pass over the ``B x D`` batch: read it, write a warm buffer.

    The memory floor's unit: a step's time divided by it is the number of
    such passes the step costs (the fastest a pass can run, so a count in
    these units is an upper bound on the passes actually made).
    """
    x, out = torch.randn(batch, dim), torch.empty(batch, dim)
    return median_times({"pass": lambda: torch.add(x, 1.0, out=out)}, repeats, min_seconds)["pass"]


def run(dims, batch, repeats, min_seconds, only=None, skip_slow_peers_above=512):
    results = {"dims": {}, "batch": batch}
    for dim in dims:
        torch.manual_seed(0)
        runners: list[Runner] = [
            PyroRunner(name, make(dim), dim)
            for name, make in our_rows().items()
            if only is None or any(o in name for o in only)
        ]
        # Above these sizes a peer's call takes minutes or tens of GB (GCP
        # inverts a dense matrix per call; zuko broadcasts the matrix over
        # the batch): they are left out of the row rather than the run.
        too_big = {"pyro GeneralizedChannelPermute": skip_slow_peers_above, "zuko": 1024}
        runners += [r for r in peer_runners(dim) if dim <= too_big.get(r.name, dim)]
        runners.append(BaseOnlyRunner(dim))
        inputs = [torch.randn(batch, dim) for _ in range(2)]
        table = {}
        for task in TASKS:
            fns = {r.name: task_fn(r, task, inputs) for r in runners}
            table[task] = median_times(fns, repeats, min_seconds, slow_seconds=SLOW_SECONDS)
        params = {r.name: sum(p.numel() for p in r.parameters()) for r in runners}
        gemm = _gemm_reference(dim, batch, repeats, min_seconds)
        one_pass = _pass_reference(dim, batch, repeats, min_seconds)
        results["dims"][dim] = {"times": table, "params": params, "gemm": gemm, "pass": one_pass}
        _print_table(dim, batch, table, params, gemm)
        _print_passes(table, one_pass)
    return results


# ----------------------------------------------------------------- report
def _print_table(dim, batch, table, params, gemm):
    names = list(table[TASKS[0]])
    ref = "nflows" if "nflows" in names else None
    print(f"\nD={dim}, B={batch}, float32: milliseconds (x nflows's time on the same task);")
    print(f"one dense B x D x D GEMM takes {gemm * 1e3:.3f} ms")
    header = f"{'layer':32s}" + "".join(f"{t:>20s}" for t in TASKS) + f"{'params':>12s}"
    print(header)
    print("-" * len(header))
    for name in names:
        cells = []
        for task in TASKS:
            t = table[task][name]
            ratio = f" ({t / table[task][ref]:.2f}x)" if ref else ""
            cells.append(f"{t * 1e3:9.3f}{ratio:>11s}")
        print(f"{name:32s}" + "".join(f"{c:>20s}" for c in cells) + f"{params[name]:>12d}")


def _print_passes(table, one_pass):
    print(f"\nelementwise passes a training step costs (its time / {one_pass * 1e3:.3f} ms, "
          "one pass over the batch into a warm buffer)")  # fmt: skip
    print(f"{'layer':32s}{'density':>10s}{'guide':>10s}")
    for name in table["density"]:
        cells = "".join(f"{table[task][name] / one_pass:10.0f}" for task in ("density", "guide"))
        print(f"{name:32s}{cells}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``pyro-lunet bench`` and this module's ``main``)."""
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024],
                        help="dimensions D to time (default: 64 256 1024)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=1024, help="batch size B (default: 1024)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default: 7)")
    parser.add_argument("--min-seconds", type=float, default=0.03, help="per timed measurement")
    parser.add_argument("--only", nargs="+", help="substrings of our row names to keep")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--quick", action="store_true", help="small dims, few repeats")


def missingpeer_runners() -> list[str]:
    """The optional peer libraries that are not installed."""
    return [
        name for name in ("nflows", "zuko", "normflows") if importlib.util.find_spec(name) is None
    ]


def run_from_args(args: argparse.Namespace, checks: Callable[[dict], dict] | None = None) -> dict:
    """Runs the benchmark for parsed options, prints the tables, returns the results.

    ``checks``, when given, is called with the results once they are complete
    and what it returns is added to them before they are written to ``--json``
    (``benchmarks/bench_layers.py`` checks the project's targets this way).
    """
    if args.quick:
        args.dims, args.batch, args.repeats, args.min_seconds = [16, 64], 64, 2, 0.005
    if missing := missingpeer_runners():
        print(f"peers not installed, left out: {', '.join(missing)} "
              '(pip install "pyro-lunet[bench]")')  # fmt: skip
    torch.set_default_dtype(torch.float32)
    results = run(args.dims, args.batch, args.repeats, args.min_seconds, args.only)
    results["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyro_lunet": __version__,
    }
    if checks is not None:
        results.update(checks(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"\nwrote {args.json}")
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
