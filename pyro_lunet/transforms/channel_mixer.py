r"""Any family's layer on images: per pixel (a 1x1 convolution) or over the whole image.

Both classes take events of shape ``(C, H, W)`` (``event_dim`` 3) with any
batch shape in front, and use the family layer's raw row kernels: one batched
call over all rows, no per-pixel loop.

* :class:`ChannelMixer` (factory :func:`channel_mixer`): the layer applied to
  the channel vector of every pixel, :math:`y_{:,h,w} = W x_{:,h,w} + b`
  (Glow's invertible 1x1 convolution with a structured :math:`W`).
* :class:`ImageMixer` (factory :func:`image_mixer`): the layer applied to the
  flattened image, :math:`\mathrm{vec}(y) = W \mathrm{vec}(x) + b` with
  :math:`D = C H W` (ButterflyFlow's whole-image butterfly layers; butterfly
  and circulant-diagonal layers stay cheap at that size).

Both are :class:`~pyro_lunet.transforms.base.VersionedCacheModule`\ s: the
same never-stale caching and the same input checks as the vector layers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import constraints

from .base import (
    ROLES,
    InvertibleLinear,
    Role,
    VersionedCacheModule,
    check_choice,
    check_positive_int,
)
from .registry import FAMILIES

__all__ = ["ChannelMixer", "ImageMixer", "ImageTransformModule", "channel_mixer", "image_mixer"]

_IMAGE = constraints.independent(constraints.real, 3)


class ImageTransformModule(VersionedCacheModule):
    """Base of the library's image transforms on ``(..., C, H, W)`` events.

    A subclass implements :meth:`_forward_ldj` and :meth:`_inverse_ldj`,
    each returning the result and the log-determinant of the sampling
    direction (shape ``batch``), and :meth:`_check_input`. The base runs the
    checks, keeps the log-determinant of the last call next to
    :class:`VersionedCacheModule`'s cached pair, so that
    ``log_abs_det_jacobian`` of that pair (what ``TransformedDistribution``
    and ``ComposeTransform`` ask for right after a call) costs nothing, and
    calls ``_before_use`` of every layer inside before any use (rank-one
    merges).

    Composite transforms call their children's ``_forward_ldj`` /
    ``_inverse_ldj`` directly, so one check and one cache serve a whole chain.
    """

    domain = _IMAGE
    codomain = _IMAGE
    bijective = True

    def __init__(self, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self._ldj: tuple | None = None
        self._unkeyed_names: tuple[str, ...] | None = None

    #: This class's own bookkeeping buffers (left out of the cache key).
    _own_unkeyed_buffers: tuple[str, ...] = ()

    @property
    def _unkeyed_buffers(self) -> tuple[str, ...]:
        # The own ones and, under their prefixes, every nested layer's: a
        # self-normalizing layer updates its tracking buffers inside a call,
        # and a key that saw them would miss the pair that call cached (a
        # chain's log-det would then rerun the sampling direction, which is
        # that family's approximate side in training mode).
        if self._unkeyed_names is None:
            names = list(self._own_unkeyed_buffers)
            for prefix, module in self.named_modules():
                if module is self or not isinstance(module, VersionedCacheModule):
                    continue
                own = (
                    module._own_unkeyed_buffers
                    if isinstance(module, ImageTransformModule)
                    else module._unkeyed_buffers
                )
                names.extend(f"{prefix}.{name}" for name in own)
            self._unkeyed_names = tuple(names)
        return self._unkeyed_names

    # ------------------------------------------------------------------ hooks
    def _forward_ldj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)`` of the sampling direction, without checks."""
        raise NotImplementedError

    def _inverse_ldj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det dy/dx|)`` (the sampling direction's log-det), without checks."""
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        raise NotImplementedError

    def _before_use(self) -> None:
        for module in self.modules():
            if isinstance(module, InvertibleLinear):
                module._before_use()

    def _apply_with_log_det(self, h: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """One step inside a fused chain (a ``Flow``): checked, uncached, with the
        sampling direction's log-det; the chain calls ``_before_use`` first."""
        self._check_input(h)
        return self._inverse_ldj(h) if inverse else self._forward_ldj(h)

    # -------------------------------------------------------------- transform
    def _call(self, x: Tensor) -> Tensor:
        self._check_input(x)
        y, ldj = self._forward_ldj(x)
        self._keep_ldj(x, y, ldj)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        self._check_input(y)
        x, ldj = self._inverse_ldj(y)
        self._keep_ldj(x, y, ldj)
        return x

    def _keep_ldj(self, x: Tensor, y: Tensor, ldj: Tensor) -> None:
        if not self._cache_size:
            return
        self._ldj = (x, y, ldj)
        if ldj.requires_grad:
            # A backward pass through the log-det frees its graph: forget it then.
            module, kept = weakref.ref(self), self._ldj

            def forget(grad: Tensor) -> None:
                owner = module()
                if owner is not None and owner._ldj is kept:
                    owner._ldj = None

            ldj.register_hook(forget)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log|det dy/dx|`` of the sampling direction, of shape ``x.shape[:-3]``.

        Free for the pair of the last call while it is cached (same tensors,
        same parameters); otherwise computed by a fresh forward pass.
        """
        kept = self._ldj
        if (
            kept is not None
            and kept[0] is x
            and kept[1] is y
            and self._cached_x_y[0] is x
            and self._cached_x_y[1] is y
            and self._cache_key == self._state_key()
        ):
            return kept[2]
        self._before_use()
        self._check_input(x)
        return self._forward_ldj(x)[1]

    def clear_cache(self) -> None:
        super().clear_cache()
        self._ldj = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_ldj"] = None
        return state

    def _reference(self) -> Tensor | None:
        return next(self.parameters(), None)

    def _check_event(self, x: Tensor, expected: tuple) -> None:
        """``ValueError`` unless ``x`` is a tensor ``(..., *expected)`` (``None`` matches any
        size) of the parameters' dtype and device."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} expects a Tensor, got {type(x).__name__}")
        shown = "(..., " + ", ".join("*" if s is None else str(s) for s in expected) + ")"
        if x.dim() < 3 or any(s is not None and s != t for s, t in zip(expected, x.shape[-3:])):
            raise ValueError(f"{name} expects inputs of shape {shown}, got {tuple(x.shape)}")
        ref = self._reference()
        if ref is None:
            return
        if x.dtype != ref.dtype:
            raise ValueError(f"{name} expects dtype {ref.dtype}, got {x.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name} expects device {ref.device}, got {x.device}")


def _check_layer(layer, dim: int, what: str) -> InvertibleLinear:
    if not isinstance(layer, InvertibleLinear):
        raise ValueError(
            f"{what} needs an InvertibleLinear layer (a registered family's), "
            f"got {type(layer).__name__}"
        )
    if layer.input_dim != dim:
        raise ValueError(f"{what} needs a layer of input_dim {dim}, got {layer.input_dim}")
    return layer


class _LinearImage(ImageTransformModule):
    """Shared plumbing of the two mixers: a family layer applied to rows of the image."""

    def __init__(self, layer: InvertibleLinear, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.layer = layer

    def _cache_extras(self) -> tuple:
        return (self.layer.role, *self.layer._cache_extras())

    def _to_rows(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        raise NotImplementedError

    def _pixels(self, x: Tensor) -> int:
        """How many times the layer's log-determinant counts per event."""
        raise NotImplementedError

    def _apply_rows(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        ldj = (self._pixels(x) * self.layer._log_abs_det()).expand(x.shape[:-3])
        return self._rows(fn, x), ldj

    def _rows(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x.clone()  # an empty batch: some kernels (MKL's FFT) refuse it
        return self._from_rows(fn(self._to_rows(x)), x)

    # The log-determinant is constant: a direct call skips it (log_abs_det_jacobian
    # computes it on demand); composites get it from _forward_ldj / _inverse_ldj.
    def _call(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self._rows(self.layer._affine_rows, x)

    def _inverse(self, y: Tensor) -> Tensor:
        self._check_input(y)
        return self._rows(self.layer._inverse_affine_rows, y)

    def _forward_ldj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply_rows(self.layer._affine_rows, x)

    def _inverse_ldj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply_rows(self.layer._inverse_affine_rows, y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        # Constant Jacobian: no forward pass needed, whatever the pair.
        self._before_use()
        self._check_input(x)
        return (self._pixels(x) * self.layer._log_abs_det()).expand(x.shape[:-3])

    def weight(self) -> Tensor:
        """The layer's dense matrix :math:`W` (inspection only)."""
        return self.layer.weight()

    def log_abs_det(self) -> Tensor:
        r"""The layer's :math:`\log|\det W|` (per pixel for :class:`ChannelMixer`)."""
        return self.layer.log_abs_det()

    @property
    def role(self) -> str:
        return self.layer.role


class ChannelMixer(_LinearImage):
    r"""A family's invertible linear layer as a 1x1 convolution on ``(..., C, H, W)``.

    Every pixel's channel vector goes through the same layer,

    .. math::

        y_{:,h,w} = W x_{:,h,w} + b, \qquad
        \log\left|\det \frac{\partial y}{\partial x}\right| = H W \log|\det W|,

    the log-determinant broadcast to the batch shape. Both directions are
    the layer's own (exact, except the self-normalizing family's fast side
    in training mode, exactly as for vectors; see
    :class:`~pyro_lunet.SelfNormalizingLinear`). ``role`` picks the layer's
    cheap or exact side as for vectors; image density models score with
    ``_inverse``, hence ``role="density"`` in :func:`channel_mixer`.

    Implementation: the image is moved to channels-last and reshaped to
    ``(B H W, C)`` rows (one copy), the layer's row kernel runs once on all
    of them, and the result is handed back as a channels-first view. Measured
    against one ``conv2d`` with the already assembled dense :math:`W` (the
    best case for a convolution: no assembly, no gradient through it;
    ``benchmarks/bench_images.py``, 1 CPU thread, 512 pixel rows): at
    :math:`C = 96` the convolution's single GEMM was 2-3x faster than the
    row path, at :math:`C = 512` the dense families tie with it and the
    butterfly and circulant rows beat it; assembling :math:`W` costs
    up to :math:`O(C^3)` per parameter value, so the row path is the one
    implemented.

    Cost for a batch of B images: the family's cost for ``B H W`` rows of
    dimension C (e.g. LU :math:`O(B H W C^2)`, butterfly and circulant
    :math:`O(B H W C \log C)`) plus two image copies; log-det the family's
    (LU :math:`O(C)`).

    Example::

        >>> import torch
        >>> from pyro_lunet import channel_mixer
        >>> mixer = channel_mixer(4, layer="butterfly", init="orthogonal")
        >>> x = torch.randn(2, 4, 5, 5)
        >>> y = mixer(x)
        >>> bool(torch.allclose(mixer.inv(y), x, atol=1e-5))
        True
        >>> mixer.log_abs_det_jacobian(x, y).shape
        torch.Size([2])

    References: Kingma & Dhariwal, "Glow", NeurIPS 2018 (the invertible 1x1
    convolution); Meng et al., "ButterflyFlow", ICML 2022; Feng & Liao,
    "CDFlow", arXiv:2510.25323 (circulant-diagonal channel mixers); Keller et
    al., "Self Normalizing Flows", ICML 2021 (a self-normalizing 1x1
    convolution); Chan et al., "LU-Net", arXiv:2302.10524.

    :param layer: an :class:`~pyro_lunet.transforms.base.InvertibleLinear` of
        ``input_dim = C``.
    :param int height: if given, inputs must have this H (else any H).
    :param int width: if given, inputs must have this W (else any W).
    :param int cache_size: 0 or 1, as for Pyro's transforms.
    """

    def __init__(
        self,
        layer: InvertibleLinear,
        height: int | None = None,
        width: int | None = None,
        cache_size: int = 1,
    ):
        super().__init__(_check_layer(layer, layer.input_dim, "ChannelMixer"), cache_size)
        self.channels = layer.input_dim
        self.height = check_positive_int("height", height, optional=True)
        self.width = check_positive_int("width", width, optional=True)

    def _check_input(self, x: Tensor) -> None:
        self._check_event(x, (self.channels, self.height, self.width))

    def _pixels(self, x: Tensor) -> int:
        return x.shape[-1] * x.shape[-2]

    def _to_rows(self, x: Tensor) -> Tensor:
        return x.movedim(-3, -1).reshape(-1, self.channels)

    def _from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        *batch, c, h, w = like.shape
        return rows.reshape(*batch, h, w, c).movedim(-1, -3)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, height={self.height}, width={self.width}"


class ImageMixer(_LinearImage):
    r"""A family's invertible linear layer on the flattened image: :math:`D = C H W`.

    .. math::

        \mathrm{vec}(y) = W\,\mathrm{vec}(x) + b, \qquad
        \log\left|\det \frac{\partial y}{\partial x}\right| = \log|\det W|,

    with ``vec`` the row-major flattening of ``(C, H, W)``. This is
    ButterflyFlow's use of butterfly layers on whole images (e.g. to undo a
    fixed pixel permutation); the butterfly and circulant-diagonal families
    cost :math:`O(B\, D \log D)` here, the dense families :math:`O(B D^2)`.

    Example::

        >>> import torch
        >>> from pyro_lunet import image_mixer
        >>> mixer = image_mixer((1, 8, 8), layer="circulant", init="orthogonal")
        >>> x = torch.randn(3, 1, 8, 8)
        >>> bool(torch.allclose(mixer.inv(mixer(x)), x, atol=1e-5))
        True

    Reference: Meng, Zhou, Choi, Dao, Ermon, "ButterflyFlow: Building
    Invertible Layers with Butterfly Matrices", ICML 2022.

    :param layer: an :class:`~pyro_lunet.transforms.base.InvertibleLinear` of
        ``input_dim = C * H * W``.
    :param tuple shape: the event shape ``(C, H, W)``.
    :param int cache_size: 0 or 1, as for Pyro's transforms.
    """

    def __init__(self, layer: InvertibleLinear, shape: tuple[int, int, int], cache_size: int = 1):
        self.shape = _check_shape(shape)
        c, h, w = self.shape
        super().__init__(_check_layer(layer, c * h * w, "ImageMixer"), cache_size)

    def _check_input(self, x: Tensor) -> None:
        self._check_event(x, self.shape)

    def _pixels(self, x: Tensor) -> int:
        return 1

    def _to_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.layer.input_dim)

    def _from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        return rows.reshape(like.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _check_shape(shape) -> tuple[int, int, int]:
    if (
        not isinstance(shape, (tuple, list, torch.Size))
        or len(shape) != 3
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
    ):
        raise ValueError(f"shape must be (C, H, W) of positive ints, got {shape!r}")
    return tuple(shape)


def _make_layer(layer, dim: int, role: str, kwargs: dict) -> InvertibleLinear:
    check_choice("role", role, ROLES)
    if callable(layer) and not isinstance(layer, str):
        if kwargs:
            raise ValueError(
                f"layer keywords {sorted(kwargs)} apply to named families only; "
                "bind them into the factory (functools.partial)"
            )
        return layer(dim)
    if not isinstance(layer, str):
        raise ValueError(f"layer must be a family name or a factory, got {layer!r}")
    return FAMILIES.lookup(layer)(dim, role=role, **kwargs)


def channel_mixer(
    channels: int,
    layer: str | Callable[[int], InvertibleLinear] = "lu",
    *,
    height: int | None = None,
    width: int | None = None,
    role: Role = "density",
    cache_size: int = 1,
    **layer_kwargs,
) -> ChannelMixer:
    """A :class:`ChannelMixer`: the family ``layer``'s layer of dimension ``channels`` per pixel.

    ``role`` defaults to ``"density"`` (unlike the vector builders' ``"guide"``):
    an image density model's ``log_prob`` runs the scoring direction, so the
    directional families (LU, SNF) put their cheap or exact side there; pass
    ``role="guide"`` for a sampler or a variational guide.

    :param int channels: C.
    :param layer: a registered family name (``"lu"``, ``"butterfly"``,
        ``"circulant"``, ``"rank_one"``, ``"self_normalizing"``; dashes allowed)
        or a factory ``input_dim -> InvertibleLinear``.
    :param int height: fixes H (inputs with another H are refused); optional.
    :param int width: fixes W; optional.
    :param str role: ``"density"`` (default) or ``"guide"``.
    :param int cache_size: 0 or 1.
    :param layer_kwargs: keywords for the family's factory (e.g. ``init="orthogonal"``).
    """
    check_positive_int("channels", channels)
    made = _make_layer(layer, channels, role, layer_kwargs)
    return ChannelMixer(made, height=height, width=width, cache_size=cache_size)


def image_mixer(
    shape: tuple[int, int, int],
    layer: str | Callable[[int], InvertibleLinear] = "butterfly",
    *,
    role: Role = "density",
    cache_size: int = 1,
    **layer_kwargs,
) -> ImageMixer:
    """An :class:`ImageMixer`: the family ``layer``'s layer on the flattened ``shape = (C, H, W)``.

    Defaults to the butterfly family, the paper's choice and cheap at
    :math:`D = C H W`; ``role`` as in :func:`channel_mixer`.
    """
    c, h, w = _check_shape(shape)
    made = _make_layer(layer, c * h * w, role, layer_kwargs)
    return ImageMixer(made, (c, h, w), cache_size=cache_size)
