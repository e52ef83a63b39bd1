"""One rank of tests/test_distributed.py's runs: ``python _dist_worker.py SCENARIO OUT RANK WORLD
PORT``, or ``torchrun ... -m tests._dist_worker SCENARIO OUT`` (rank and rendezvous from
torchrun's environment). The single-process reference runs the same functions without a
process group."""

from __future__ import annotations

import datetime
import json
import sys
import traceback
from functools import partial
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as td
from pyro.infer.autoguide import AutoNormalizingFlow

import pyro_lunet
from pyro_lunet import Flow, LeakySoftplus, distributed, layer_factory, training

FAMILIES = ["lu", "butterfly", "circulant", "rank_one", "self_normalizing"]
DIM = 4


def every_family_flow(dim: int, role: str, merge_every: int | None = None) -> Flow:
    """One layer of each family, with activations between them."""
    parts = []
    for i, family in enumerate(FAMILIES):
        kwargs = {"merge_every": merge_every} if family == "rank_one" and merge_every else {}
        parts.append(layer_factory(family, role=role, **kwargs)(dim))
        if i < len(FAMILIES) - 1:
            parts.append(LeakySoftplus(0.1, inverse=role == "density"))
    return Flow(parts, input_dim=dim)


def fit_data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    mix = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)
    x = torch.randn(201, DIM, generator=gen, dtype=torch.float64) @ mix
    return x + 0.3 * x.square()  # not Gaussian


def run_fit(progress: bool = False, rank: int = 0) -> tuple[torch.nn.Module, pyro_lunet.FitResult]:
    """201 rows: 161 train in batches of 40 (the fifth batch has one row), 4 epochs = 20 steps.

    Each rank builds its flow from another seed: fit_density starts every rank from rank 0's
    (parameters, buffers and the rank-one layer's own seed)."""
    torch.manual_seed(1 + 100 * rank)
    flow = every_family_flow(DIM, "density").double()
    result = pyro_lunet.fit_density(
        flow, fit_data(), epochs=4, batch_size=40, lr=1e-2, val_fraction=0.2, seed=3,
        progress=progress,
    )  # fmt: skip
    return flow, result


def svi_model(data: torch.Tensor, idx: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(torch.zeros(DIM, dtype=data.dtype), 1.0).to_event(1))
    with pyro.plate("data", len(data), subsample=idx):
        pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=data[idx])


def run_svi(steps: int = 20, batch: int = 16) -> dict:
    """The data-parallel SVI recipe (pyro_lunet.distributed's docstring); without a group,
    the same loop on the global batches."""
    data = fit_data()[:64]
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    guide = AutoNormalizingFlow(
        svi_model, partial(every_family_flow, role="guide", merge_every=3)
    ).double()
    gen = torch.Generator().manual_seed(11)
    order = torch.randperm(len(data), generator=gen)
    guide(data, order[:1])  # builds the guide's parameters
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    elbo = pyro.infer.Trace_ELBO()
    for step in range(steps):
        start = step * batch % len(data)
        idx = order[start : start + batch]
        loss = elbo.differentiable_loss(svi_model, guide, data, distributed.shard(idx))
        optimizer.zero_grad()
        loss.backward()
        distributed.all_reduce_gradients(guide.parameters())
        optimizer.step()
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}


def _fail_on_call(count: int):
    calls = [0]
    original = training.penalty

    def penalty(module):
        calls[0] += 1
        if calls[0] == count:
            raise RuntimeError("injected failure on this rank")
        return original(module)

    training.penalty = penalty


def _divergence(flow: torch.nn.Module) -> list[str]:
    """The errors of the consistency checks once rank 1 differs (in the last bit of one
    buffer; in the data), and of a write that fails on rank 0."""
    errors = []
    with torch.no_grad():
        buffer = next(b for b in flow.buffers() if b.is_floating_point() and b.numel() > 1)
        if distributed.rank() == 1:
            buffer.view(-1)[0] = torch.nextafter(buffer.view(-1)[0], torch.tensor(2.0).double())
    try:
        distributed.check_replicas(flow, "after the test's change")
    except RuntimeError as error:
        errors.append(str(error))
    try:
        distributed.check_same(torch.arange(4.0) + distributed.rank(), "data")
    except ValueError as error:
        errors.append(str(error))

    def failing_write():
        raise OSError("disk full (the test's)")

    try:
        distributed.write_on_main(failing_write)
    except (OSError, RuntimeError) as error:
        errors.append(f"{type(error).__name__}: {error}")
    return errors


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if len(sys.argv) > 3:
        rank, world, port = (int(a) for a in sys.argv[3:6])
        td.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )  # fmt: skip
    else:
        assert distributed.init_from_env("gloo", timeout_s=30)
        rank = distributed.rank()
    sys.stderr = open(out / f"stderr{rank}.txt", "w")  # noqa: SIM115 (closed at exit)
    try:
        if scenario == "fit":
            flow, result = run_fit(progress=True, rank=rank)
            wrote = []
            path = out / "model.pt"

            def write():
                wrote.append(rank)
                torch.save(flow.state_dict(), path)

            distributed.write_on_main(write)
            assert path.exists()  # every rank sees the file once rank 0 is done
            state = {k: v.clone() for k, v in flow.state_dict().items()}
            torch.save(
                {"state": state, "history": result.history, "wrote": wrote,
                 "best_epoch": result.best_epoch, "svi": run_svi(), "errors": _divergence(flow)},
                out / f"rank{rank}.pt",
            )  # fmt: skip
        elif scenario == "fail":
            if rank == 1:
                _fail_on_call(7)
            run_fit(rank=rank)
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
    except Exception as error:
        (out / f"error{rank}.json").write_text(
            json.dumps({"type": type(error).__name__, "message": str(error),
                        "trace": traceback.format_exc()})
        )  # fmt: skip
        return 1
    finally:
        if td.is_initialized() and not (out / f"error{rank}.json").exists():
            td.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
