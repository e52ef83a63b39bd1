"""Built-in toy data sets, generated offline and reproducibly."""

from __future__ import annotations

import math

import torch

__all__ = [
    "DIGITS_LEVELS",
    "DIGITS_SHAPE",
    "TOY_DATA",
    "checkerboard",
    "digits",
    "gaussian_mixture",
    "gaussian_mixture_log_prob",
    "moons",
]

_MIXTURE_RADIUS = 2.0
_MIXTURE_SCALE = 0.25
_MIXTURE_COMPONENTS = 8


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else seed)
    return gen


def _mixture_means(dtype=torch.float32) -> torch.Tensor:
    angles = torch.arange(_MIXTURE_COMPONENTS, dtype=dtype) * (2 * math.pi / _MIXTURE_COMPONENTS)
    return _MIXTURE_RADIUS * torch.stack([angles.cos(), angles.sin()], -1)


def gaussian_mixture(num_samples: int, seed: int | None = 0) -> torch.Tensor:
    """Eight isotropic Gaussians (scale 0.25) evenly spaced on a circle of radius 2.

    The 2-D toy density of the LU-Net paper's experiments; its exact log
    density is :func:`gaussian_mixture_log_prob`, so a fitted model's held-out
    NLL can be compared with the data's own entropy.
    """
    gen = _generator(seed)
    which = torch.randint(_MIXTURE_COMPONENTS, (num_samples,), generator=gen)
    noise = torch.randn(num_samples, 2, generator=gen)
    return _mixture_means()[which] + _MIXTURE_SCALE * noise


def gaussian_mixture_log_prob(x: torch.Tensor) -> torch.Tensor:
    """The exact log density of :func:`gaussian_mixture` at ``x`` (``(..., 2)``)."""
    means = _mixture_means(x.dtype).to(x.device)
    sq = (x.unsqueeze(-2) - means).pow(2).sum(-1) / _MIXTURE_SCALE**2
    log_norm = math.log(2 * math.pi * _MIXTURE_SCALE**2) + math.log(_MIXTURE_COMPONENTS)
    return torch.logsumexp(-0.5 * sq, -1) - log_norm


def moons(num_samples: int, seed: int | None = 0, noise: float = 0.1) -> torch.Tensor:
    """Two interleaving half circles with Gaussian noise (as scikit-learn's ``make_moons``)."""
    gen = _generator(seed)
    upper = torch.rand(num_samples, generator=gen) < 0.5
    t = torch.rand(num_samples, generator=gen) * math.pi
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    return torch.stack([x, y], -1) + noise * torch.randn(num_samples, 2, generator=gen)


def checkerboard(num_samples: int, seed: int | None = 0) -> torch.Tensor:
    """Uniform on the black squares of a 4 x 4 checkerboard on [-2, 2]^2."""
    gen = _generator(seed)
    x = torch.rand(num_samples, generator=gen) * 4 - 2
    offset = torch.randint(2, (num_samples,), generator=gen).float()
    y = torch.rand(num_samples, generator=gen) - offset * 2 + (torch.floor(x) % 2)
    return torch.stack([x, y], -1)


#: The digits' image shape: 8 x 8 pixels, one of 17 grey levels each.
DIGITS_SHAPE = (8, 8)
#: The digits' number of grey levels: integers 0..16.
DIGITS_LEVELS = 17


def digits(seed: int | None = 0, dequantize: bool = True) -> torch.Tensor:
    """scikit-learn's bundled 8 x 8 handwritten digits, dequantized: ``(1797, 64)``.

    Each pixel is an integer grey level in 0..16; adding uniform noise in
    [0, 1) (seeded) gives continuous values in [0, 17), whose density a flow
    can fit without collapsing onto the integers (the standard
    dequantization). ``dequantize=False`` returns the integer grey levels
    themselves (as floats), for a model that draws fresh noise every step
    (:func:`pyro_lunet.image_flows.dequantize`). No download: the images ship
    inside scikit-learn, which this function needs (the ``cli`` extra:
    ``pip install "pyro-lunet[cli]"``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            'the digits ship with scikit-learn: pip install "pyro-lunet[cli]" (or scikit-learn)'
        ) from None

    levels = torch.from_numpy(load_digits().data).float()
    if not dequantize:
        return levels
    return levels + torch.rand(levels.shape, generator=_generator(seed))


TOY_DATA = {"gaussian-mixture": gaussian_mixture, "moons": moons, "checkerboard": checkerboard}
