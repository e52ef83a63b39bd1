"""The figures ``pyro-lunet fit`` writes: loss curves, a 2-D density map, a grid of images.

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
def density_map(model, data: np.ndarray, samples: np.ndarray, path: Path, size: int = 200) -> None:
    """The model's density on a grid over 2-D data, with data and samples over it."""
    low, high = np.quantile(data, [0.005, 0.995], axis=0)
    pad = 0.15 * (high - low)
    low, high = low - pad, high + pad
    xs, ys = (np.linspace(low[i], high[i], size) for i in range(2))
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    like = model.base_dist.mean  # the model's device and dtype
    log_p = torch.cat([model.log_prob(like.new_tensor(chunk)) for chunk in np.split(grid, size)])
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True, sharey=True)
    extent = (low[0], high[0], low[1], high[1])
    image = left.imshow(log_p.exp().reshape(size, size).cpu().numpy(), origin="lower",
                        extent=extent, aspect="auto", cmap="viridis")  # fmt: skip
    fig.colorbar(image, ax=left, label="density")
    left.set_title("learned density")
    shown = min(len(data), len(samples), 2000)
    right.scatter(*data[:shown].T, s=2, alpha=0.5, label="data")
    right.scatter(*samples[:shown].T, s=2, alpha=0.5, label="samples")
    right.set(xlim=extent[:2], ylim=extent[2:], title="data and samples")
    right.legend(markerscale=5)
    fig.savefig(path, dpi=120)


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
