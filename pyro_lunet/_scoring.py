"""Scoring helpers shared by :func:`pyro_lunet.fit_density` and the command line.

Private: the public surface is :mod:`pyro_lunet.training`.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

__all__ = ["held_out_count", "log_prob_in_chunks", "mean_nll", "standard_normal"]


def standard_normal(
    dim: int, like: torch.Tensor, validate_args: bool | None = None
) -> dist.Distribution:
    """``N(0, I_dim)`` as a Pyro distribution with event dim 1, on ``like``'s device and dtype."""
    zero = like.new_zeros(dim)
    return dist.Normal(zero, torch.ones_like(zero), validate_args=validate_args).to_event(1)


def held_out_count(num_rows: int, val_fraction: float) -> int:
    """How many of ``num_rows`` rows :func:`pyro_lunet.fit_density` holds out (at least one)."""
    return max(1, round(val_fraction * num_rows))


def log_prob_in_chunks(model: dist.TransformedDistribution, rows: torch.Tensor,
                       chunk: int = 4096) -> torch.Tensor:  # fmt: skip
    """``model.log_prob(rows)`` in eval mode and without gradients, ``chunk`` rows at a time.

    Eval mode gives every layer's exact log-determinant (SNF's is tracked in
    training mode); each module's mode is restored afterwards.
    """
    modules = [m for t in model.transforms if isinstance(t, torch.nn.Module) for m in t.modules()]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            return torch.cat([model.log_prob(part) for part in rows.split(chunk)])
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode


def mean_nll(model: dist.TransformedDistribution, rows: torch.Tensor, chunk: int = 4096) -> float:
    """Mean ``-log p`` of ``rows`` in nats, as :func:`log_prob_in_chunks` scores them."""
    return -log_prob_in_chunks(model, rows, chunk).mean().item()
