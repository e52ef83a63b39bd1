"""Small-D speed, where SVI guides live: one step of every builder against Pyro, zuko and nflows.

A guide step is what one SVI particle batch costs a flow guide: ``rsample((4,))``,
``log_prob`` of those draws, a stand-in model term (``|z|^2 / 2``, so that the
backward pass runs through the map and not only its log-determinant) and a
backward pass. A density step is
``log_prob`` of a batch of 256 data points and a backward pass. Every row is
timed round robin with the others (median of rounds, one thread), and
reported as a ratio to the reference in the same run: Pyro's ``AutoIAFNormal``
flow with three transforms (``iterated(3, affine_autoregressive)``) for whole
flows, one Pyro IAF layer for single layers. Beside the single layers, the
families that run at small D as an assembled dense matrix (butterfly,
circulant) show that assembly alone (forward and backward, no rows): the part
of their step that has no counterpart in an LU layer's.

    python benchmarks/bench_small_d.py --dims 4 10 32 64
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import affine_autoregressive, iterated

import pyro_lunet
from pyro_lunet.cli.bench import median_times

GUIDE_DRAWS = 4
DENSITY_BATCH = 256
FLOW_REFERENCE = "pyro IAF x3"
LAYER_REFERENCE = "pyro IAF layer"
PEER_PREFIXES = ("zuko ", "nflows ")  # the peers' rows, which the targets leave out
ASSEMBLY = " (assembly only)"  # a part of a layer's step, not a step: no target


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if "Model name" in line)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


# ------------------------------------------------------------------ the rows
def flows(dim: int, role: str) -> dict[str, Callable[[], torch.nn.Module]]:
    """Our builders' flows and the Pyro reference, as factories."""
    rows = {FLOW_REFERENCE: lambda: iterated(3, affine_autoregressive, dim)}
    rows["lu_net(D, 4)"] = lambda: pyro_lunet.lu_net(dim, 4, role=role)
    for name in pyro_lunet.families():
        rows[f"activation_flow[{name}]"] = lambda n=name: pyro_lunet.activation_flow(
            dim, 4, layer=n, role=role
        )
    rows["coupling_flow[lu]"] = lambda: pyro_lunet.coupling_flow(dim, 4, layer="lu", role=role)
    return rows


def layers(dim: int) -> dict[str, Callable[[], torch.nn.Module]]:
    rows = {LAYER_REFERENCE: lambda: affine_autoregressive(dim)}
    for name, family in pyro_lunet.FAMILIES.items():
        rows[name] = lambda f=family: f.factory(dim)
    return rows


def autograd_nodes(loss: torch.Tensor) -> int:
    """How many autograd nodes a loss's backward pass runs (at small D, what a step costs)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(parent for parent, _ in node.next_functions)
    return len(seen)


def pyro_step(transform: torch.nn.Module, dim: int, task: str, data: torch.Tensor):
    base = dist.Normal(torch.zeros(dim), 1.0).to_event(1)
    model = dist.TransformedDistribution(base, transform)
    params = [p for p in transform.parameters() if p.requires_grad]

    def loss():
        if task == "guide":  # KL(q || N(0, I)) by 4 draws: the model term needs dz/dtheta too
            z = model.rsample((GUIDE_DRAWS,))
            return (model.log_prob(z) + 0.5 * z.square().sum(-1)).mean()
        return -model.log_prob(data.clone()).mean()  # a fresh tensor, as a loader gives

    def step():
        for p in params:
            p.grad = None
        loss().backward()

    step.nodes = lambda: autograd_nodes(loss())
    return step


def zuko_steps(dim: int, task: str, data: torch.Tensor) -> dict[str, Callable[[], None]]:
    try:
        import zuko
    except ImportError:
        return {}
    out = {}
    for name, make in (("zuko MAF x3", zuko.flows.MAF), ("zuko NSF x3", zuko.flows.NSF)):
        flow = make(dim, transforms=3)

        def step(flow=flow):
            flow.zero_grad(set_to_none=True)
            d = flow()
            if task == "guide":
                z = d.rsample((GUIDE_DRAWS,))
                loss = (d.log_prob(z) + 0.5 * z.square().sum(-1)).mean()
            else:
                loss = -d.log_prob(data).mean()
            loss.backward()

        out[name] = step
    return out


def nflows_steps(dim: int, task: str, data: torch.Tensor) -> dict[str, Callable[[], None]]:
    try:
        from nflows.distributions import StandardNormal
        from nflows.flows import Flow
        from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform
    except ImportError:
        return {}
    parts = [MaskedAffineAutoregressiveTransform(dim, 10 * dim) for _ in range(3)]
    flow = Flow(CompositeTransform(parts), StandardNormal([dim]))

    def step():
        flow.zero_grad(set_to_none=True)
        if task == "guide":
            z, log_prob = flow.sample_and_log_prob(GUIDE_DRAWS)
            loss = (log_prob + 0.5 * z.square().sum(-1)).mean()
        else:
            loss = -flow.log_prob(data).mean()
        loss.backward()

    return {"nflows MAF x3": step}


def assembly_steps(dim: int) -> dict[str, Callable[[], None]]:
    """For each family that runs at this D as an assembled dense matrix (butterfly,
    circulant): building that matrix and its log-det from the parameters, and their
    backward, with no rows at all: the part of a step no batch size changes."""
    steps = {}
    for name, family in pyro_lunet.FAMILIES.items():
        layer = family.factory(dim)
        if not getattr(layer, "_use_dense_matrix", lambda: False)():
            continue

        def step(layer=layer):
            matrices, log_det = type(layer)._dense_sides([layer], False)
            (matrices[0].sum() + log_det).backward()

        steps[f"{name}{ASSEMBLY}"] = step
    return steps


# ------------------------------------------------------------------- the run
def table(dim: int, task: str, repeats: int, min_seconds: float, single: bool, clock) -> dict:
    torch.manual_seed(0)
    data = torch.randn(DENSITY_BATCH, dim)
    role = "guide" if task == "guide" else "density"
    makers = layers(dim) if single else flows(dim, role)
    fns = {name: pyro_step(make(), dim, task, data) for name, make in makers.items()}
    if single:
        fns.update(assembly_steps(dim))
    else:
        fns.update(zuko_steps(dim, task, data))
        fns.update(nflows_steps(dim, task, data))
    nodes = {name: fn.nodes() for name, fn in fns.items() if hasattr(fn, "nodes")}
    times = median_times(fns, repeats, min_seconds, clock=clock)
    reference = times[LAYER_REFERENCE if single else FLOW_REFERENCE]
    return {name: (t, t / reference, nodes.get(name)) for name, t in times.items()}


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    width = max(len(name) for name in rows)
    print(f"  {'':<{width}}  {'time':>11}  {'ratio':>6}  autograd nodes")
    for name, (seconds, ratio, nodes) in rows.items():
        print(f"  {name:<{width}}  {seconds * 1e3:8.3f} ms  {ratio:5.2f}x  {nodes or ''}")


# Issue 15: at these D every builder's flow, and at every D every family's
# single layer, at most as slow as Pyro's IAF reference.
TARGET_DIMS = (10, 32)


def check_targets(results: dict) -> list[tuple[str, float, bool]]:
    """``(what, ratio, met)`` for every measured row the targets cover (the peers are not ours)."""
    outcomes = []
    for (dim, task, kind), rows in results.items():
        if kind == "flows" and dim not in TARGET_DIMS:
            continue
        for name, (_, ratio, _) in rows.items():
            reference = name in (FLOW_REFERENCE, LAYER_REFERENCE)
            if reference or name.startswith(PEER_PREFIXES) or name.endswith(ASSEMBLY):
                continue
            what = f"{name} {task} step at D={dim}" + (", one layer" if kind == "layers" else "")
            outcomes.append((what, ratio, ratio <= 1.0))
    return outcomes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[4, 10, 32, 64])
    parser.add_argument("--tasks", nargs="+", default=["guide", "density"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this process's CPU time (steadier on a shared machine; with one thread "
        "it is the step's own work), wall: elapsed time",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"machine: {machine()}, {args.clock} clock")
    results = {}
    for dim in args.dims:
        for task in args.tasks:
            rows = table(dim, task, args.repeats, args.min_seconds, False, clock)
            print_table(f"D={dim}, {task} step, ratio to {FLOW_REFERENCE}", rows)
            results[(dim, task, "flows")] = rows
        rows = table(dim, "guide", args.repeats, args.min_seconds, True, clock)
        print_table(f"D={dim}, guide step of one layer, ratio to {LAYER_REFERENCE}", rows)
        results[(dim, "guide", "layers")] = rows
    print("\ntargets (<= 1.00x the reference in this run):")
    for what, ratio, met in check_targets(results):
        print(f"  [{'met ' if met else 'MISS'}] {what}: {ratio:.2f}x")
    return results


if __name__ == "__main__":
    main()
