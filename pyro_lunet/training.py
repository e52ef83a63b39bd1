"""Training-loop helpers shared by every family."""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field

import pyro.distributions as dist
import torch

__all__ = ["FitResult", "fit_density", "penalty", "standard_normal"]


def penalty(module: torch.nn.Module) -> torch.Tensor:
    """The sum of every layer's training penalty inside ``module``'s tree.

    A layer takes part by defining ``penalty() -> Tensor`` (for instance a
    self-normalizing layer's reconstruction term, or a rank-one-updated
    layer's range penalty). Layers without one contribute nothing, so any
    loop may write ``loss = nll + pyro_lunet.penalty(flow)``.

    :returns: a 0-dim tensor on the module's device and dtype (zero when no
        layer has a penalty).
    """
    total = None
    for sub in module.modules():
        term = getattr(sub, "penalty", None)
        if callable(term):
            value = term()
            total = value if total is None else total + value
    if total is not None:
        return total
    ref = next((t for t in module.parameters() if t.is_floating_point()), torch.zeros(()))
    return ref.new_zeros(())


def standard_normal(dim: int, like: torch.Tensor) -> dist.Distribution:
    """``N(0, I_dim)`` as a Pyro distribution with event dim 1, on ``like``'s device and dtype."""
    zero = like.new_zeros(dim)
    return dist.Normal(zero, torch.ones_like(zero)).to_event(1)


@dataclass
class FitResult:
    """What :func:`fit_density` returns.

    ``model`` is the fitted ``TransformedDistribution`` (its flow holds the
    best validation checkpoint); ``history`` has one entry per epoch.
    """

    model: dist.TransformedDistribution
    best_val_nll: float
    best_epoch: int
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


def fit_density(
    flow: torch.nn.Module,
    data: torch.Tensor,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-2,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> FitResult:
    """Fits ``TransformedDistribution(N(0, I), flow)`` to ``data``'s rows by maximum likelihood.

    Adam on ``-log p(x)`` (nats) plus :func:`penalty` of the flow, with a
    held-out split, the best validation state kept and restored at the end,
    and a one-line progress display with the live NLL. Runs on the device and
    dtype of ``data`` (the flow must already be there).

    :param flow: a transform from base noise to data (``log_prob`` runs its
        inverse).
    :param data: ``(N, D)`` rows.
    :returns: a :class:`FitResult`.
    """
    if data.dim() != 2:
        raise ValueError(f"data must have shape (N, D), got {tuple(data.shape)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=gen).to(data.device)
    num_val = max(1, int(round(val_fraction * data.shape[0])))
    val, train = data[order[:num_val]], data[order[num_val:]]
    model = dist.TransformedDistribution(standard_normal(data.shape[1], data), flow)
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    history: dict[str, list[float]] = {"train_nll": [], "val_nll": []}
    best = (math.inf, -1, copy.deepcopy(flow.state_dict()))
    start = time.perf_counter()
    for epoch in range(epochs):
        flow.train()
        total, count = 0.0, 0
        perm = torch.randperm(train.shape[0], generator=gen).to(data.device)
        for batch in train[perm].split(batch_size):
            nll = -model.log_prob(batch).mean()
            loss = nll + penalty(flow)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += nll.detach() * batch.shape[0]
            count += batch.shape[0]
        flow.eval()
        with torch.no_grad():
            val_nll = -model.log_prob(val).mean().item()
        history["train_nll"].append((total / count).item())
        history["val_nll"].append(val_nll)
        if val_nll < best[0]:
            best = (val_nll, epoch, copy.deepcopy(flow.state_dict()))
        if progress:
            _progress(epoch + 1, epochs, history["train_nll"][-1], val_nll)
    flow.load_state_dict(best[2])
    flow.eval()
    if progress:
        sys.stderr.write("\n")
    return FitResult(model, best[0], best[1], history, time.perf_counter() - start)


def _progress(done: int, total: int, train_nll: float, val_nll: float) -> None:
    width = 24
    filled = round(width * done / total)
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(
        f"\r[{bar}] epoch {done}/{total}  train NLL {train_nll:.4f}  val NLL {val_nll:.4f} nats"
    )
    sys.stderr.flush()
