"""The figures ``pyro-lunet fit`` writes: loss curves, a 2-D density map, a grid of images.

Needs matplotlib (the ``cli`` extra).

Drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot), so
nothing touches a global backend or leaks figures in a long-lived process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["density_map", "loss_curves", "sample_grid"]


def loss_curves(history: dict[str, list[float]], path: Path, unit: str = "nats") -> None:
    """Training and validation NLL per epoch."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    epochs = np.arange(1, len(history["train_nll"]) + 1)
    ax.plot(epochs, history["train_nll"], label="training (mean over the epoch)")
    ax.plot(epochs, history["val_nll"], label="validation (after the epoch)")
    best = int(np.argmin(history["val_nll"]))
    ax.plot(epochs[best], history["val_nll"][best], "o", color="C1", label="best, kept")
    ax.set(xlabel="epoch", ylabel=f"negative log-likelihood ({unit} per row)")
    ax.legend()
    fig.savefig(path, dpi=120)


@torch.no_grad()
def density_map(
    model, data: np.ndarray, samples: np.ndarray, path: Path, size: int = 200,
    val_nll: float | None = None, true_log_prob=None, true_nll: float | None = None,
) -> None:  # fmt: skip
    """The model's density on a grid over 2-D data, beside the data and the model's samples.

    With ``true_log_prob`` (a function of ``(N, 2)`` float64 rows) the true
    density comes first, on the same colour scale, so the two read side by
    side; ``val_nll`` and ``true_nll`` go into the titles.
    """
    low, high = np.quantile(data, [0.005, 0.995], axis=0)
    pad = 0.15 * (high - low)
    low, high = low - pad, high + pad
    xs, ys = (np.linspace(low[i], high[i], size) for i in range(2))
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    like = model.base_dist.mean  # the model's device and dtype
    # In chunks of up to 10,000 points: large enough that per-call overhead does not dominate
    # (200 calls of 200 points took 6 s for the demo's spline flow), small enough for memory.
    chunks = np.array_split(grid, -(-len(grid) // 10_000))
    log_p = torch.cat([model.log_prob(like.new_tensor(chunk)) for chunk in chunks])
    learned = log_p.exp().reshape(size, size).cpu().double().numpy()
    maps = [("learned density", learned, val_nll)]
    if true_log_prob is not None:
        truth = true_log_prob(torch.from_numpy(grid)).exp().reshape(size, size).numpy()
        maps.insert(0, ("true density", truth, true_nll))
    fig = Figure(figsize=(4.2 * (len(maps) + 1), 4.6), layout="constrained")
    axes = fig.subplots(1, len(maps) + 1, sharex=True, sharey=True)
    extent = (low[0], high[0], low[1], high[1])
    # One colour scale: the truth's peak, or the learned map's 99.5th percentile (a
    # spike of a poor fit would otherwise wash everything else out).
    vmax = float(np.nanmax(maps[0][1])) if true_log_prob is not None else 0.0
    vmax = max(vmax, float(np.nanquantile(learned, 0.995))) * 1.05 or 1.0
    for ax, (title, values, nll) in zip(axes, maps):
        image = ax.imshow(values, origin="lower", extent=extent, aspect="equal",
                          cmap="magma", vmin=0.0, vmax=vmax)  # fmt: skip
        ax.set_title(title if nll is None else f"{title}\nheld-out NLL {nll:.3f} nats")
    fig.colorbar(image, ax=axes[: len(maps)].tolist(), label="density", shrink=0.8)
    right = axes[-1]
    shown = min(len(data), len(samples), 2000)
    right.scatter(*data[:shown].T, s=2, alpha=0.5, label="data")
    right.scatter(*samples[:shown].T, s=2, alpha=0.5, label="model samples")
    right.set(xlim=extent[:2], ylim=extent[2:], title="data and samples", aspect="equal")
    right.legend(markerscale=5, loc="center")  # a ring leaves its middle free
    fig.savefig(path, dpi=110)


def sample_grid(
    samples: np.ndarray, image_shape: tuple[int, ...], path: Path, value_range: tuple[float, float]
) -> None:
    """Samples shown as images (up to 8 x 8 of them), clipped to the data's value range."""
    count = min(len(samples), 64)
    cols = min(8, count)
    rows = -(-count // cols)
    fig = Figure(figsize=(cols, rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, image in zip(axes, samples[:count]):
        ax.imshow(np.clip(image.reshape(image_shape), *value_range), cmap="gray_r",
                  vmin=value_range[0], vmax=value_range[1])  # fmt: skip
    for ax in axes:
        ax.axis("off")
    fig.savefig(path, dpi=100)
