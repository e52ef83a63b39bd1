r"""Glow-style multiscale image flows with any family's layers as mixers.

:func:`image_flow` builds one :class:`~pyro_lunet.Flow` (``event_dim=3``)
from base noise of shape ``(C, H, W)`` to images of the same shape::

    model = dist.TransformedDistribution(
        dist.Normal(torch.zeros(shape), 1.0).to_event(3), image_flow(shape))

Its pieces, each an exact bijection with an exact log-determinant (written
here in the scoring direction, data to noise, as in the Glow paper):

* **squeeze** (space-to-depth): ``(C, H, W) -> (4C, H/2, W/2)``, each 2x2
  patch of a channel becoming 4 channels (``c -> 4c + 2 dy + dx``); a
  permutation, log-det 0;
* :class:`ActNorm`: a per-channel affine map with a data-dependent
  initialization;
* the **channel mixer**: a family's layer on every pixel's channel vector
  (:func:`~pyro_lunet.channel_mixer`), optionally followed by a
  **whole-image mixer** on the flattened level (:func:`~pyro_lunet.image_mixer`);
* :class:`ConvAffineCoupling`: an affine coupling whose scale and shift come
  from a small convolutional network of the other half of the channels;
* the **split**: at the end of every level but the last, half of the
  channels leave the flow (they are latent from then on) and the other half
  goes on to the next level, squeezed again. Glow's learned prior for the
  factored-out half, a Gaussian whose mean and scale depend on the kept
  half, is written as one more :class:`ConvAffineCoupling` (the same map),
  so that the base stays a standard normal.

**The shape-preserving multiscale.** Squeezing is channel-major, so the
squeeze of the first :math:`k` channels is the first :math:`4k` channels of
the squeeze of all of them. Level :math:`l` therefore works on the first
:math:`k_l = 2^{l+1} C` channels of the image squeezed :math:`l` times, of
shape :math:`(4^l C, H/2^l, W/2^l)`, and leaves the others (the channels
factored out before) alone. Each level is one transform on ``(C, H, W)``
(:class:`MultiscaleLevel`: a gather of its active block, its steps, a
scatter back), so the flow keeps the event shape and the base is
``Normal(0, 1)`` over ``(C, H, W)``: Pyro's ``TransformedDistribution`` and
``AutoNormalizingFlow``-style use work unchanged. Up to a fixed permutation
of the latent (which a standard normal does not see) this is Glow's
multiscale architecture.

**Dequantization and units.** Image data are discrete. For pixel values
:math:`x \in \{0, \dots, L-1\}^D` (:math:`L = 256` for 8-bit images, 17 for
scikit-learn's digits), :func:`dequantize` draws
:math:`u = (x + v) / L`, :math:`v \sim U[0, 1)^D`, and the model is a density
:math:`p(u)` on :math:`[0, 1]^D` (e.g. an image flow followed by
:func:`unit_interval`, whose log-determinant is part of ``log_prob``). Since
the cells of volume :math:`L^{-D}` partition the cube,
:math:`\log P(x) \ge \mathbb{E}_v[\log p(u)] - D \log L` (Jensen), and

.. math::

    \text{bits/dim} = \frac{-\log p(u) + D \log L}{D \log 2}

(:func:`bits_per_dim`), an upper bound on the discrete model's bits per
dimension in the data's own space; a uniform :math:`p` gives exactly
:math:`\log_2 L`.

References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1
Convolutions", NeurIPS 2018 (squeeze, actnorm, 1x1 convolution, coupling,
split); Dinh, Sohl-Dickstein, Bengio, "Density estimation using Real NVP",
ICLR 2017 (multiscale, dequantization, logit); Meng et al., "ButterflyFlow",
ICML 2022; Keller et al., "Self Normalizing Flows", ICML 2021; Feng & Liao,
"CDFlow", arXiv:2510.25323; Chan et al., "LU-Net", arXiv:2302.10524.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import AffineTransform, ComposeTransform, SigmoidTransform, Transform

from .transforms.base import ROLES, check_choice, check_positive_int
from .transforms.channel_mixer import (
    ChannelMixer,
    ImageMixer,
    ImageTransformModule,
    _check_shape,
    _make_layer,
)
from .transforms.flow import Flow

__all__ = [
    "ActNorm",
    "ConvAffineCoupling",
    "MultiscaleLevel",
    "bits_per_dim",
    "dequantize",
    "image_flow",
    "squeeze",
    "unit_interval",
    "unsqueeze",
]


# ------------------------------------------------------------------- squeeze
def squeeze(x: Tensor) -> Tensor:
    """Space-to-depth: ``(..., C, H, W) -> (..., 4C, H/2, W/2)``, channel ``4c + 2 dy + dx``."""
    *batch, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze needs an even height and width, got {(c, h, w)}")
    b = len(batch)
    x = x.reshape(*batch, c, h // 2, 2, w // 2, 2).permute(*range(b), b, b + 2, b + 4, b + 1, b + 3)
    return x.reshape(*batch, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """Depth-to-space, the inverse of :func:`squeeze`: ``(..., 4C, H, W) -> (..., C, 2H, 2W)``."""
    *batch, c4, h, w = x.shape
    if c4 % 4:
        raise ValueError(f"unsqueeze needs channels divisible by 4, got {(c4, h, w)}")
    b = len(batch)
    x = x.reshape(*batch, c4 // 4, 2, 2, h, w).permute(*range(b), b, b + 3, b + 1, b + 4, b + 2)
    return x.reshape(*batch, c4 // 4, 2 * h, 2 * w)


# -------------------------------------------------------------------- actnorm
class ActNorm(ImageTransformModule):
    r"""Per-channel affine map with a data-dependent initialization (Glow's actnorm).

    Sampling direction :math:`y_{c,h,w} = e^{s_c} x_{c,h,w} + b_c`, scoring
    :math:`x = e^{-s} (y - b)`, :math:`\log|\det| = H W \sum_c s_c`. Cost
    O(B C H W).

    **Initialization.** The first scoring call (``_inverse``, what
    ``log_prob`` runs) in training mode on at least two values per channel
    sets :math:`b` to the per-channel mean and :math:`s` to the log of the
    per-channel standard deviation of its input (over batch and pixels), so
    that the scored activations start standardized; until then the map is
    the identity. A flow can thus be built before it sees data, and the
    first training batch initializes it (every actnorm of a chain in turn,
    on the activations that reach it). The buffer ``initialized`` records
    this in ``state_dict``: a loaded flow is initialized without a dummy
    forward. :meth:`initialize` sets it from a given batch explicitly.

    Example::

        >>> import torch
        >>> norm = ActNorm(3)
        >>> z = norm.inv(5 + 2 * torch.randn(64, 3, 4, 4))   # initializes
        >>> bool(norm.initialized), bool(z.mean().abs() < 1e-5)
        (True, True)

    :param int channels: C.
    :param int cache_size: 0 or 1.
    """

    def __init__(self, channels: int, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.channels = check_positive_int("channels", channels)
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # a host copy of ``initialized``: no sync on the hot path

    # ``initialized`` flips once, in the call that initializes: the call's result
    # already uses the new values, so it must not invalidate that pair.
    _own_unkeyed_buffers = ("initialized",)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)  # once per load

    def _check_input(self, x: Tensor) -> None:
        self._check_event(x, (self.channels, None, None))

    @torch.no_grad()
    def initialize(self, y: Tensor) -> None:
        """Sets :math:`b, s` to the per-channel mean and log standard deviation of ``y``."""
        rows = y.detach().movedim(-3, -1).reshape(-1, self.channels)
        if rows.shape[0] < 2:
            raise ValueError(
                f"ActNorm.initialize needs at least 2 values per channel, got {rows.shape[0]}"
            )
        mean = rows.mean(0)
        std = rows.std(0, unbiased=False)
        self.loc.copy_(mean)
        self.log_scale.copy_(torch.log(std + 1e-6))
        self.initialized.fill_(True)
        self._ready = True

    def _log_det(self, x: Tensor) -> Tensor:
        pixels = x.shape[-1] * x.shape[-2]
        return (pixels * self.log_scale.sum()).expand(x.shape[:-3])

    def _forward_ldj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scale = self.log_scale.exp()[:, None, None]
        return x * scale + self.loc[:, None, None], self._log_det(x)

    def _inverse_ldj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self._ready and self.training:
            count = y.numel() // self.channels if y.numel() else 0
            if count >= 2:
                self.initialize(y)
        scale = (-self.log_scale).exp()[:, None, None]
        return (y - self.loc[:, None, None]) * scale, self._log_det(y)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


# ------------------------------------------------------------------- coupling
class ConvAffineCoupling(ImageTransformModule):
    r"""An affine coupling whose scale and shift come from a small convolutional network.

    With :math:`x = (x_a, x_b)` split along channels (:math:`C_a = \lfloor C/2
    \rfloor`), :math:`(r, t) = \mathrm{NN}(x_a)` and the bounded log-scale
    :math:`\sigma = \beta \tanh(r / \beta)`:

    .. math::

        y_a = x_a, \qquad y_b = e^{\sigma} \odot x_b + t, \qquad
        \log|\det| = \textstyle\sum_{c,h,w} \sigma_{c,h,w}

    (sampling direction; scoring is :math:`x_b = e^{-\sigma} (y_b - t)`).
    NN is conv 3x3 -> ReLU -> conv 1x1 -> ReLU -> conv 3x3, the last
    convolution zero-initialized (Glow), so the layer starts as the identity.
    The tanh bound :math:`\beta` keeps every scale in :math:`[e^{-\beta},
    e^{\beta}]` (Glow uses a sigmoid for the same purpose). Cost: the
    network's, :math:`O(B H W (9 C_a K + K^2 + 18 K C_b))` for K hidden
    channels, in both directions.

    Example::

        >>> import torch
        >>> layer = ConvAffineCoupling(4, hidden_channels=8)
        >>> x = torch.randn(2, 4, 6, 6)
        >>> bool(torch.equal(layer(x), x))   # identity at initialization
        True

    Reference: Dinh et al., "Density estimation using Real NVP", ICLR 2017;
    Kingma & Dhariwal, "Glow", NeurIPS 2018.

    :param int channels: C (at least 2).
    :param int hidden_channels: K.
    :param float scale_bound: :math:`\beta > 0`.
    :param int cache_size: 0 or 1.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int = 64,
        scale_bound: float = 2.0,
        cache_size: int = 1,
    ):
        super().__init__(cache_size=cache_size)
        self.channels = check_positive_int("channels", channels, minimum=2)
        check_positive_int("hidden_channels", hidden_channels)
        if not (isinstance(scale_bound, (int, float)) and scale_bound > 0):
            raise ValueError(f"scale_bound must be a positive number, got {scale_bound!r}")
        self.scale_bound = float(scale_bound)
        self.split = channels // 2
        out = 2 * (channels - self.split)
        self.net = nn.Sequential(
            nn.Conv2d(self.split, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, out, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _check_input(self, x: Tensor) -> None:
        self._check_event(x, (self.channels, None, None))

    def _scale_shift(self, a: Tensor) -> tuple[Tensor, Tensor]:
        *batch, c, h, w = a.shape
        out = self.net(a.reshape(-1, c, h, w)).reshape(
            *batch, 2 * (self.channels - self.split), h, w
        )
        raw, shift = out.chunk(2, dim=-3)
        bound = self.scale_bound
        return bound * torch.tanh(raw / bound), shift

    def _forward_ldj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x[..., : self.split, :, :], x[..., self.split :, :, :]
        log_scale, shift = self._scale_shift(a)
        y = torch.cat([a, b * log_scale.exp() + shift], dim=-3)
        return y, log_scale.sum((-3, -2, -1))

    def _inverse_ldj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        a, b = y[..., : self.split, :, :], y[..., self.split :, :, :]
        log_scale, shift = self._scale_shift(a)
        x = torch.cat([a, (b - shift) * (-log_scale).exp()], dim=-3)
        return x, log_scale.sum((-3, -2, -1))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale_bound={self.scale_bound}"


# ---------------------------------------------------------------- any transform
class _Wrapped(ImageTransformModule):
    """Any transform on ``(..., C, H, W)`` events (e.g. Pyro's ``GeneralizedChannelPermute``)
    as a step of a :class:`MultiscaleLevel`."""

    def __init__(self, transform: Transform):
        super().__init__(cache_size=0)
        if getattr(transform, "domain", None) is None or transform.domain.event_dim != 3:
            raise ValueError(
                f"a mixer transform must act on (C, H, W) events (event_dim 3), got {transform!r}"
            )
        self.transform = transform

    def _check_input(self, x: Tensor) -> None:
        self._check_event(x, (None, None, None))

    def _forward_ldj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.transform(x)
        return y, self.transform.log_abs_det_jacobian(x, y)

    def _inverse_ldj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = self.transform.inv(y)
        return x, self.transform.log_abs_det_jacobian(x, y)


# ---------------------------------------------------------------------- level
class MultiscaleLevel(ImageTransformModule):
    r"""Level :math:`l` of a shape-preserving multiscale flow on ``(C, H, W)`` events.

    Squeezes the image :math:`l` times, to :math:`(4^l C, H/2^l, W/2^l)`,
    runs its ``steps`` (image transforms on that shape's first ``active``
    channels, in sampling order) and puts the result back; the other
    channels pass through unchanged. The squeezes are one precomputed gather
    and one scatter. Log-det: the steps' sum. See :mod:`pyro_lunet.image_flows`.

    :param tuple shape: the event shape ``(C, H, W)``; H, W divisible by :math:`2^l`.
    :param int level: :math:`l \ge 0`.
    :param int active: how many channels of the squeezed image the steps transform.
    :param steps: :class:`~pyro_lunet.transforms.channel_mixer.ImageTransformModule`\ s
        on ``(active, H/2^l, W/2^l)``, in sampling order.
    """

    def __init__(self, shape, level: int, active: int, steps, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        c, h, w = self.shape = _check_shape(shape)
        self.level = check_positive_int("level", level, minimum=0)
        f = 2**level
        if h % f or w % f:
            raise ValueError(f"level {level} needs H and W divisible by {f}, got {(c, h, w)}")
        self.active_shape = (active, h // f, w // f)
        if not 1 <= active <= c * f * f:
            raise ValueError(f"active must be in [1, {c * f * f}], got {active!r}")
        index = torch.arange(c * h * w).reshape(c, h, w)
        for _ in range(level):
            index = squeeze(index)
        self.register_buffer("index", index[:active].reshape(-1), persistent=False)
        self.steps = nn.ModuleList(steps)

    def _check_input(self, x: Tensor) -> None:
        self._check_event(x, self.shape)

    def _run(self, x: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        batch = x.shape[:-3]
        flat = x.flatten(-3)
        part = flat.index_select(-1, self.index).reshape(*batch, *self.active_shape)
        ldj = x.new_zeros(batch)
        for step in self.steps if forward else reversed(self.steps):
            part, term = step._forward_ldj(part) if forward else step._inverse_ldj(part)
            ldj = ldj + term
        out = flat.clone()
        out[..., self.index] = part.flatten(-3)
        return out.reshape(x.shape), ldj

    def _forward_ldj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(x, True)

    def _inverse_ldj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(y, False)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, level={self.level}, active_shape={self.active_shape}"


# -------------------------------------------------------------------- builder
def _mixer(layer, channels: int, role: str, kwargs: dict, h: int, w: int) -> ImageTransformModule:
    made = _make_layer(layer, channels, role, kwargs)
    if isinstance(made, ImageTransformModule):
        return made
    if isinstance(made, Transform) and made.domain.event_dim == 3:
        return _Wrapped(made)
    return ChannelMixer(made, height=h, width=w)


def _chain(parts: list) -> Flow:
    # One module: each part's output and log-det in one pass, one cache.
    return Flow(parts, event_dim=3)


def image_flow(
    shape: tuple[int, int, int],
    num_levels: int = 2,
    steps_per_level: int = 4,
    layer: str | Callable = "lu",
    hidden_channels: int = 64,
    *,
    role: str = "density",
    image_mixer: str | Callable | None = None,
    split_prior: bool = True,
    scale_bound: float = 2.0,
    layer_kwargs: dict | None = None,
    image_mixer_kwargs: dict | None = None,
) -> Flow:
    r"""A Glow-style multiscale flow from ``Normal(0, 1)`` noise of shape ``(C, H, W)`` to images.

    ``num_levels`` levels, level :math:`l` on the image squeezed :math:`l`
    times, each of ``steps_per_level`` steps, in the scoring direction
    (data to noise)

    .. math::

        \text{ActNorm} \to \text{channel mixer} \to [\text{image mixer}] \to
        \text{ConvAffineCoupling},

    and, between levels, the split (with Glow's learned prior as one more
    coupling when ``split_prior``); see :mod:`pyro_lunet.image_flows` for
    the shape-preserving layout, dequantization and bits/dim. Level
    :math:`l` transforms :math:`2^{l+1} C` channels of size
    :math:`H/2^l \times W/2^l`. Every piece is exact in both directions with
    an exact log-determinant (the self-normalizing family's fast side in
    training mode aside, as for vectors).

    ``role`` (default ``"density"``) orients the mixers: a density model's
    ``log_prob`` runs the scoring direction, where the directional families
    (LU: triangular products instead of solves; SNF: its exact :math:`W`)
    then put their cheap or exact side. Use ``role="guide"`` for a sampler.
    The mixers start from ``init="orthogonal"`` (random rotations, as in
    Glow) unless ``layer_kwargs`` sets ``init``; the couplings and actnorms
    start at the identity, the actnorms initialize from the first training
    batch scored (:class:`ActNorm`).

    Cost per batch: dominated by the coupling networks (3 convolutions with
    ``hidden_channels`` channels per step); a channel mixer costs the
    family's per-pixel cost (:class:`~pyro_lunet.ChannelMixer`).

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import image_flow
        >>> flow = image_flow((1, 8, 8), num_levels=2, steps_per_level=2,
        ...                   layer="butterfly", hidden_channels=8)
        >>> model = dist.TransformedDistribution(
        ...     dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3), flow)
        >>> model.log_prob(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5])
        >>> model.sample((2,)).shape
        torch.Size([2, 1, 8, 8])

    :param tuple shape: ``(C, H, W)``, H and W divisible by :math:`2^{L}`.
    :param int num_levels: L >= 1.
    :param int steps_per_level: steps per level (>= 1).
    :param layer: the channel mixer: a family name, a factory ``channels ->
        InvertibleLinear``, or a factory returning a transform on ``(C, H,
        W)`` events (e.g. ``pyro.distributions.transforms.GeneralizedChannelPermute``).
    :param int hidden_channels: the coupling networks' width.
    :param str role: ``"density"`` or ``"guide"``.
    :param image_mixer: ``None`` (default) or a family name / factory for a
        whole-image mixer in every step (:class:`~pyro_lunet.ImageMixer`;
        ``"butterfly"`` or ``"circulant"`` are cheap at :math:`D = C H W`).
    :param bool split_prior: learn Glow's conditional prior for the
        factored-out channels.
    :param float scale_bound: the couplings' log-scale bound.
    :param dict layer_kwargs: keywords for the channel mixer's family factory.
    :param dict image_mixer_kwargs: keywords for the image mixer's family factory.
    """
    c, h, w = _check_shape(shape)
    check_positive_int("num_levels", num_levels)
    check_positive_int("steps_per_level", steps_per_level)
    check_positive_int("hidden_channels", hidden_channels)
    check_choice("role", role, ROLES)
    f = 2**num_levels
    if h % f or w % f:
        raise ValueError(
            f"num_levels={num_levels} needs H and W divisible by {f}, got shape {(c, h, w)}"
        )
    layer_kwargs = dict(layer_kwargs or {})
    image_mixer_kwargs = dict(image_mixer_kwargs or {})
    if isinstance(layer, str):
        layer_kwargs.setdefault("init", "orthogonal")
    if isinstance(image_mixer, str):
        image_mixer_kwargs.setdefault("init", "orthogonal")
    levels = []
    for level in range(1, num_levels + 1):
        k, lh, lw = c * 2 ** (level + 1), h // 2**level, w // 2**level
        steps = []  # scoring order
        for _ in range(steps_per_level):
            steps.append(ActNorm(k))
            steps.append(_mixer(layer, k, role, layer_kwargs, lh, lw))
            if image_mixer is not None:
                made = _make_layer(image_mixer, k * lh * lw, role, image_mixer_kwargs)
                steps.append(ImageMixer(made, (k, lh, lw)))
            steps.append(ConvAffineCoupling(k, hidden_channels, scale_bound))
        if split_prior and level < num_levels:
            steps.append(ConvAffineCoupling(k, hidden_channels, scale_bound))
        levels.append(MultiscaleLevel((c, h, w), level, k, steps[::-1]))
    return _chain(levels[::-1])  # sampling order: the coarsest level first


# ------------------------------------------------------------- data and units
def dequantize(x: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Uniform dequantization :math:`u = (x + v) / L`, :math:`v \sim U[0, 1)`, into
    :math:`[0, 1)`, for integer-valued ``x`` in :math:`\{0, \dots, L-1\}` (any float dtype)."""
    check_positive_int("levels", levels, minimum=2)
    noise = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return (x + noise) / levels


def unit_interval(alpha: float = 0.05) -> Transform:
    r"""The map :math:`\mathbb{R} \to (0, 1)`, :math:`u = (\mathrm{sigmoid}(v) - \alpha) /
    (1 - 2\alpha)`: put it after an image flow to get a density on the unit cube
    (the logit preprocessing of Real NVP, counted in the log-det). Elementwise."""
    if not (isinstance(alpha, (int, float)) and 0 <= alpha < 0.5):
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha!r}")
    span = 1.0 - 2.0 * alpha
    return ComposeTransform([SigmoidTransform(), AffineTransform(-alpha / span, 1.0 / span)])


def bits_per_dim(log_prob: Tensor, num_dims: int, levels: int) -> Tensor:
    r"""Bits per dimension in the data's discrete space, from a density on the unit cube.

    .. math::

        \text{bits/dim} = \frac{-\log p(u) + D \log L}{D \log 2},

    with ``log_prob`` :math:`= \log p(u)` of dequantized data
    :math:`u = (x + v)/L` (:func:`dequantize`), :math:`D` = ``num_dims`` and
    :math:`L` = ``levels`` (256 for 8-bit images, 17 for scikit-learn's
    digits). A uniform density gives :math:`\log_2 L`.
    """
    check_positive_int("num_dims", num_dims)
    check_positive_int("levels", levels, minimum=2)
    return (-log_prob + num_dims * math.log(levels)) / (num_dims * math.log(2.0))
