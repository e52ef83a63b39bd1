r"""Conditional structured layers and flows: every family conditioned on a context.

A conditional layer keeps a family's learned structured matrix :math:`W`
unconditioned and lets a small network of the context :math:`c` set a
per-dimension log-scale :math:`s(c)` and shift :math:`t(c)` on its output,

.. math::

    y = e^{s(c)} \odot (W x + b) + t(c),

so the inverse and the log-determinant keep the family's cost and only add
O(D) per row:

.. math::

    x = W^{-1}\bigl(e^{-s(c)} \odot (y - t(c)) - b\bigr), \qquad
    \log\left|\det \frac{\partial y}{\partial x}\right|
        = \log|\det W| + \textstyle\sum_i s_i(c).

The classes follow Pyro's conditional pattern
(:class:`~pyro.distributions.ConditionalTransformModule`):
``layer.condition(context)`` returns a transform, and
:class:`~pyro.distributions.ConditionalTransformedDistribution` conditions a
whole stack at once. :func:`conditional_flow` builds a ready conditional flow
(conditional mixers of any family between Pyro's conditional coupling layers)
for conditional density models and amortized variational guides.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
from pyro.distributions.conditional import (
    ConditionalComposeTransformModule,
    ConditionalTransformModule,
)
from pyro.distributions.transforms import (
    conditional_affine_coupling,
    conditional_spline_autoregressive,
)
from torch import Tensor
from torch.distributions import constraints

from .fingerprint import parameter_fingerprint
from .transforms._fused import soft_bound
from .transforms.base import (
    InvertibleLinear,
    Role,
    VersionedCacheModule,
    check_choice,
    check_input_dim,
    check_positive_int,
    check_vector_input,
)
from .transforms.registry import FAMILIES

__all__ = [
    "ConditionalChannelMixer",
    "ConditionalFlow",
    "ConditionalStructuredLinear",
    "ConditionedChannelMixer",
    "ConditionedStructuredLinear",
    "conditional_butterfly_linear",
    "conditional_channel_mixer",
    "conditional_circulant_diagonal_linear",
    "conditional_flow",
    "conditional_linear",
    "conditional_lu_linear",
    "conditional_rank_one_updated_linear",
    "conditional_self_normalizing_linear",
]


def _check_hidden_dims(hidden_dims) -> list[int]:
    if isinstance(hidden_dims, (int, str)) or not isinstance(hidden_dims, Sequence):
        raise ValueError(f"hidden_dims must be a list of positive ints, got {hidden_dims!r}")
    return [check_positive_int("hidden_dims[i]", h) for h in hidden_dims]


def _context_net(context_dim: int, hidden_dims: list[int], out_dim: int) -> torch.nn.Sequential:
    """An MLP ``context_dim -> hidden_dims -> out_dim`` whose last layer starts at zero."""
    layers: list[torch.nn.Module] = []
    width = context_dim
    for h in hidden_dims:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    last = torch.nn.Linear(width, out_dim)
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    layers.append(last)
    return torch.nn.Sequential(*layers)


def _broadcast(*shapes: Sequence[int]) -> torch.Size:
    """The broadcast of ``shapes`` (``torch.broadcast_shapes``'s rule, in plain Python:
    this runs on every call of a conditioned layer, where torch's version costs more
    than the layer). Raises ``RuntimeError`` for shapes that do not broadcast."""
    ndim = max(len(shape) for shape in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[i] not in (1, size):
                    raise RuntimeError(f"shapes {shapes} do not broadcast")
                out[i] = size
    return torch.Size(out)


class ConditionalStructuredLinear(ConditionalTransformModule):
    r"""A family's structured layer with a context-dependent scale and shift.

    For a context :math:`c \in \mathbb{R}^C` and an input :math:`x \in
    \mathbb{R}^D`, the conditioned map (``self.condition(c)``) is

    .. math::

        y = e^{s(c)} \odot (W x + b) + t(c), \qquad
        \log\left|\det \tfrac{\partial y}{\partial x}\right|
            = \log|\det W| + \textstyle\sum_{i=1}^D s_i(c),

    where :math:`y = W x + b` is ``linear`` (any
    :class:`~pyro_lunet.transforms.InvertibleLinear`, learned and shared by
    all contexts) and :math:`(s, t) = g(c)` come from an MLP ``context_net``
    whose last layer starts at zero, so the layer starts as ``linear`` itself
    (the identity for the families' default init). With ``log_scale_bound``
    :math:`B` the log-scale is softly bounded, :math:`s = B \tanh(\tilde s /
    B)`, which keeps :math:`e^{s}` in :math:`[e^{-B}, e^{B}]` and equals
    :math:`\tilde s` near zero.

    The scale sits on the output (data) side in the forward, sampling,
    direction: an amortized guide sets each coordinate's scale and location
    per observation, and :math:`W` shapes the correlations. Contexts may be
    batched, ``(*batch_c, C)``; inputs ``(*batch_x, D)`` broadcast against
    ``batch_c``, and the log-determinant is exact per row, of shape
    ``broadcast(batch_x, batch_c)``. :math:`W x + b` runs on the input's own
    shape before broadcasting, so an unbatched input with a batch of contexts
    pays for one structured product.

    ``role`` is the layer's: it picks which direction runs the family's cheap
    or exact side (see :data:`~pyro_lunet.transforms.base.Role`).

    Cost per batch of N rows: the family's product (or solve), O(N D) for the
    scale and shift, and the context network's
    :math:`O(N_c (C h + h^2 + 2 h D))` for :math:`N_c` contexts and width
    :math:`h`. No O(D^3) step is added to any family.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import conditional_linear
        >>> layer = conditional_linear(3, context_dim=2, layer="butterfly")
        >>> cond = dist.ConditionalTransformedDistribution(
        ...     dist.Normal(torch.zeros(3), 1.0).to_event(1), [layer])
        >>> context = torch.randn(5, 2)
        >>> cond.condition(context).log_prob(torch.randn(5, 3)).shape
        torch.Size([5])
        >>> cond.condition(context).sample().shape   # one draw per context
        torch.Size([5, 3])

    References: Winkler, Worrall, Hoogeboom, Welling, "Learning Likelihoods
    with Conditional Normalizing Flows", arXiv:1912.00042 (2019), for
    conditional flows with context-dependent affine layers; Kingma, Dhariwal,
    "Glow", NeurIPS 2018, for an invertible linear mixer between coupling
    layers; the family papers for :math:`W` (see :mod:`pyro_lunet.transforms`).

    :param linear: the structured layer :math:`W x + b`, an
        :class:`~pyro_lunet.transforms.InvertibleLinear`.
    :param int context_dim: the context dimension C.
    :param hidden_dims: the context network's hidden widths (default
        ``[max(32, 2 (C + D))]``); ``[]`` makes :math:`(s, t)` affine in :math:`c`.
    :param log_scale_bound: the soft bound :math:`B` on :math:`|s|` (default 5),
        or ``None`` for none.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self,
        linear: InvertibleLinear,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        log_scale_bound: float | None = 5.0,
    ):
        super().__init__()
        if not isinstance(linear, InvertibleLinear):
            raise ValueError(
                f"linear must be a pyro_lunet InvertibleLinear layer, got {type(linear).__name__}"
            )
        self.context_dim = check_positive_int("context_dim", context_dim)
        self.input_dim = linear.input_dim
        if hidden_dims is None:
            hidden_dims = [max(32, 2 * (context_dim + linear.input_dim))]
        self.hidden_dims = _check_hidden_dims(hidden_dims)
        if log_scale_bound is not None and not float(log_scale_bound) > 0:
            raise ValueError(f"log_scale_bound must be positive or None, got {log_scale_bound!r}")
        self.log_scale_bound = None if log_scale_bound is None else float(log_scale_bound)
        self.linear = linear
        ref = next(linear.parameters())
        self.context_net = _context_net(context_dim, self.hidden_dims, 2 * linear.input_dim).to(
            device=ref.device, dtype=ref.dtype
        )

    @property
    def role(self) -> str:
        """The direction ``role`` of the structured layer."""
        return self.linear.role

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, context_dim={self.context_dim}, "
            f"log_scale_bound={self.log_scale_bound}"
        )

    def check_context(self, context: Tensor) -> Tensor:
        """``context`` if it is a ``(*batch, C)`` tensor of the layer's dtype and device.

        :raises ValueError: naming what was expected and what came.
        """
        name = type(self).__name__
        if not isinstance(context, Tensor):
            raise ValueError(f"{name} expects a context Tensor, got {type(context).__name__}")
        if context.dim() == 0 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"{name} expects a context of shape (..., {self.context_dim}), "
                f"got {tuple(context.shape)}"
            )
        ref = self.context_net[-1].weight
        if context.dtype != ref.dtype:
            raise ValueError(f"{name} expects a context of dtype {ref.dtype}, got {context.dtype}")
        if context.device != ref.device:
            raise ValueError(
                f"{name} expects a context on device {ref.device}, got {context.device}"
            )
        return context

    def log_scale_and_shift(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The per-dimension :math:`(s(c), t(c))`, each of shape ``(*batch_c, D)``."""
        out = self.context_net(self.check_context(context))
        raw, shift = out.split(self.input_dim, dim=-1)
        if self.log_scale_bound is not None:
            raw = soft_bound(raw, (-self.log_scale_bound, self.log_scale_bound))
        return raw, shift

    def condition(self, context: Tensor) -> ConditionedStructuredLinear:
        """The transform :math:`x \\mapsto e^{s(c)} \\odot (W x + b) + t(c)` for ``context``."""
        return ConditionedStructuredLinear(self, self.check_context(context))


class ConditionedStructuredLinear(VersionedCacheModule):
    r"""A :class:`ConditionalStructuredLinear` conditioned on one (batched) context.

    Made by :meth:`ConditionalStructuredLinear.condition`; computes
    :math:`y = e^{s(c)} \odot (W x + b) + t(c)`, its exact inverse and its
    log-determinant per row. It shares the conditional layer's parameters and
    caches like every layer of the library (:class:`VersionedCacheModule`: a
    sample's ``log_prob`` reuses the pair, and nothing cached outlives a
    parameter update). :math:`(s, t)` are computed once per parameter state
    and reused by both directions and the log-determinant.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, conditional: ConditionalStructuredLinear, context: Tensor):
        super().__init__(cache_size=1)
        # The conditional module is held, not registered: this transform owns no
        # parameters of its own (it is made anew for every context), and its cache
        # key fingerprints the conditional module's tensors, listed once here
        # rather than by walking the module tree on every call.
        object.__setattr__(self, "conditional", conditional)
        self.context = context
        self.input_dim = conditional.input_dim
        self._context_batch = context.shape[:-1]
        linear = conditional.linear
        skip = set(linear._unkeyed_buffers)
        self._tensors = [
            *conditional.parameters(),
            *(b for name, b in linear.named_buffers() if name not in skip),
        ]
        self._stash: tuple | None = None

    def _cache_extras(self) -> tuple:
        linear = self.conditional.linear
        return (
            linear.training,
            self.conditional.context_net.training,
            self.context._version,
            *linear._cache_extras(),
            *parameter_fingerprint(self._tensors, requires_grad=True),
        )

    def _before_use(self) -> None:
        self.conditional.linear._before_use()

    def _scale_shift(self) -> tuple[Tensor, Tensor]:
        key = self._state_key()
        stash = self._stash
        if stash is not None and stash[0] == key:
            return stash[1], stash[2]
        s, t = self.conditional.log_scale_and_shift(self.context)
        self._stash = (key, s, t)
        if s.requires_grad or t.requires_grad:
            # A backward pass frees the graph behind (s, t): recompute after it.
            # Only a weak reference: the hook lives in autograd's graph, where a
            # cycle back to this module would escape Python's collector.
            token, module = self._stash, weakref.ref(self)

            def forget(grad: Tensor) -> None:
                owner = module()
                if owner is not None and owner._stash is token:
                    owner._stash = None

            (s if s.requires_grad else t).register_hook(forget)
        return s, t

    def _check(self, x: Tensor) -> None:
        name = type(self).__name__
        check_vector_input(name, x, self.input_dim, self.context)
        try:
            _broadcast(x.shape[:-1], self._context_batch)
        except RuntimeError:
            raise ValueError(
                f"{name} expects inputs whose batch shape broadcasts with the context's "
                f"{tuple(self._context_batch)}, got {tuple(x.shape)}"
            ) from None

    def _call(self, x: Tensor) -> Tensor:
        self._check(x)
        linear = self.conditional.linear
        s, t = self._scale_shift()
        return torch.addcmul(t, s.exp(), linear._batched(linear._affine_rows, x))

    def _inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        linear = self.conditional.linear
        s, t = self._scale_shift()
        return linear._batched(linear._inverse_affine_rows, (y - t) * (-s).exp())

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`\\log|\\det W| + \\sum_i s_i(c)`, of shape ``broadcast(x, y, context)[:-1]``."""
        self._before_use()
        s, _ = self._scale_shift()
        shape = _broadcast(x.shape[:-1], y.shape[:-1], self._context_batch)
        value = self.conditional.linear._log_abs_det() + s.sum(-1)
        return value.expand(shape)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return _broadcast(shape, (*self._context_batch, self.input_dim))

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return _broadcast(shape, (*self._context_batch, self.input_dim))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, context_shape={tuple(self.context.shape)}"


LayerSpec = str | Callable[[int], InvertibleLinear]


def _make_linear(input_dim: int, layer: LayerSpec, role: str, layer_kwargs: dict):
    from .flows import layer_factory  # flows imports transforms; keep the import light

    made = layer_factory(layer, role=role, **layer_kwargs)(input_dim)
    if not isinstance(made, InvertibleLinear) or made.input_dim != input_dim:
        raise ValueError(
            f"layer must make a pyro_lunet InvertibleLinear of input_dim {input_dim}, "
            f"got {type(made).__name__}"
            + (f" of input_dim {made.input_dim}" if isinstance(made, InvertibleLinear) else "")
        )
    return made


def conditional_linear(
    input_dim: int,
    context_dim: int,
    layer: LayerSpec = "lu",
    role: Role = "guide",
    hidden_dims: Sequence[int] | None = None,
    log_scale_bound: float | None = 5.0,
    **layer_kwargs,
) -> ConditionalStructuredLinear:
    r"""A :class:`ConditionalStructuredLinear` of any family, by name.

    :math:`y = e^{s(c)} \odot (W x + b) + t(c)` with :math:`W` a fresh layer
    of the family ``layer`` (:func:`~pyro_lunet.families`, or a factory
    ``input_dim -> InvertibleLinear``), built with ``role`` and
    ``layer_kwargs``. Identity at initialization for the families' default
    init.

    Example::

        >>> import torch
        >>> from pyro_lunet import conditional_linear
        >>> layer = conditional_linear(4, context_dim=3, layer="circulant")
        >>> t = layer.condition(torch.randn(3))
        >>> x = torch.randn(10, 4)
        >>> bool(torch.allclose(t(x), x))       # the identity at initialization
        True

    :param int input_dim: the dimension D.
    :param int context_dim: the context dimension C.
    :param layer: a family name or a factory.
    :param str role: ``"guide"`` (default) or ``"density"``.
    :param hidden_dims: the context network's hidden widths.
    :param log_scale_bound: the soft bound on the log-scale, or ``None``.
    :param layer_kwargs: keywords for the family's factory (e.g. ``init``).
    """
    check_input_dim(input_dim)
    check_positive_int("context_dim", context_dim)
    linear = _make_linear(input_dim, layer, role, layer_kwargs)
    return ConditionalStructuredLinear(linear, context_dim, hidden_dims, log_scale_bound)


def _family_factory(family: str, doc_name: str):
    def factory(input_dim: int, context_dim: int, **kwargs) -> ConditionalStructuredLinear:
        return conditional_linear(input_dim, context_dim, layer=family, **kwargs)

    factory.__name__ = factory.__qualname__ = f"conditional_{doc_name}"
    factory.__doc__ = (
        f"A :class:`ConditionalStructuredLinear` around a ``{family!r}`` layer: "
        f"``conditional_linear(input_dim, context_dim, layer={family!r}, **kwargs)``."
    )
    return factory


conditional_lu_linear = _family_factory("lu", "lu_linear")
conditional_butterfly_linear = _family_factory("butterfly", "butterfly_linear")
conditional_circulant_diagonal_linear = _family_factory("circulant", "circulant_diagonal_linear")
conditional_rank_one_updated_linear = _family_factory("rank_one", "rank_one_updated_linear")
conditional_self_normalizing_linear = _family_factory("self_normalizing", "self_normalizing_linear")


class ConditionalFlow(ConditionalComposeTransformModule):
    """A stack of conditional (and plain) transforms, conditioned all at once.

    Pyro's :class:`~pyro.distributions.conditional.ConditionalComposeTransformModule`
    with a ``role`` record; made by :func:`conditional_flow`. ``condition(c)``
    returns a :class:`~pyro.distributions.torch_transform.ComposeTransformModule`.
    """

    def __init__(self, transforms, role: str = "guide"):
        super().__init__(transforms)
        self.role = role


def conditional_flow(
    input_dim: int,
    context_dim: int,
    num_blocks: int = 4,
    layer: LayerSpec = "lu",
    coupling: Literal["affine", "spline"] = "affine",
    hidden_dims: Sequence[int] | None = None,
    role: Role = "guide",
    context_hidden_dims: Sequence[int] | None = None,
    log_scale_bound: float | None = 5.0,
    layer_kwargs: dict | None = None,
    coupling_kwargs: dict | None = None,
) -> ConditionalFlow:
    r"""A conditional flow: ``num_blocks`` x [conditional mixer, coupling], then a mixer.

    .. math::

        f_c = M_{K+1, c} \circ T_{K, c} \circ M_{K, c} \circ \cdots
              \circ T_{1, c} \circ M_{1, c},

    every mixer :math:`M_{k, c}` a :class:`ConditionalStructuredLinear` of the
    family ``layer`` and every :math:`T_{k, c}` one of Pyro's conditional
    layers: ``coupling="affine"``,
    :func:`~pyro.distributions.transforms.conditional_affine_coupling`
    (both directions in closed form); ``coupling="spline"``,
    :func:`~pyro.distributions.transforms.conditional_spline_autoregressive`,
    oriented by ``role`` so that its parallel direction is the one the role
    needs (sampling for ``"guide"``, scoring for ``"density"``; the other
    direction takes D sequential passes). The first mixer starts at the
    identity and the later ones at Haar-random rotations (named families
    without an ``init`` in ``layer_kwargs``), so the couplings do not all split
    the same coordinates.

    The result is a :class:`~pyro.distributions.ConditionalTransformModule`
    from base noise to data. A conditional density model::

        cond = dist.ConditionalTransformedDistribution(base, [flow])
        loss = -cond.condition(context).log_prob(x).mean()

    and an amortized guide, a flow conditioned on each data point's
    observation inside a plate (subsampling included)::

        def guide(x):
            pyro.module("flow", flow)
            with pyro.plate("data", len(x), subsample_size=32) as idx:
                pyro.sample("z", cond.condition(x[idx]))

    A batch of contexts ``(N, C)`` gives a distribution of batch shape
    ``(N,)`` from an unbatched base (the first mixer broadcasts the noise).

    Cost per batch: the family's cost per mixer, the context networks' and
    the coupling networks' (MLPs on :math:`\lfloor D/2 \rfloor + C` inputs).

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import conditional_flow
        >>> flow = conditional_flow(3, context_dim=2, num_blocks=2, layer="lu")
        >>> cond = dist.ConditionalTransformedDistribution(
        ...     dist.Normal(torch.zeros(3), 1.0).to_event(1), [flow])
        >>> context = torch.randn(8, 2)
        >>> cond.condition(context).log_prob(torch.randn(8, 3)).shape
        torch.Size([8])
        >>> cond.condition(context).sample().shape
        torch.Size([8, 3])

    References: Winkler et al., "Learning Likelihoods with Conditional
    Normalizing Flows", arXiv:1912.00042; Dinh, Sohl-Dickstein, Bengio,
    "Density estimation using Real NVP", ICLR 2017; Kingma, Dhariwal, "Glow",
    NeurIPS 2018; Durkan et al., "Neural Spline Flows", NeurIPS 2019.

    :param int input_dim: the dimension D (at least 2 when ``num_blocks > 0``).
    :param int context_dim: the context dimension C.
    :param int num_blocks: the number K of [mixer, coupling] blocks (>= 0).
    :param layer: a family name (:func:`~pyro_lunet.families`) or a factory.
    :param str coupling: ``"affine"`` or ``"spline"``.
    :param hidden_dims: the coupling networks' hidden widths (Pyro's default when ``None``).
    :param str role: ``"guide"`` (default) or ``"density"``: orients the mixers
        and the spline layers.
    :param context_hidden_dims: the mixers' context networks' hidden widths.
    :param log_scale_bound: the mixers' soft log-scale bound, or ``None``.
    :param dict layer_kwargs: keywords for the family's factory.
    :param dict coupling_kwargs: more keywords for Pyro's coupling factory.
    """
    check_input_dim(input_dim)
    check_positive_int("context_dim", context_dim)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
    check_choice("coupling", coupling, ("affine", "spline"))
    check_choice("role", role, ("guide", "density"))
    if input_dim < 2 and num_blocks > 0:
        raise ValueError(f"coupling layers need input_dim >= 2, got {input_dim}")
    if isinstance(layer, str) and layer not in FAMILIES:
        raise ValueError(f"layer must be a factory or one of {list(FAMILIES)}, got {layer!r}")
    layer_kwargs = dict(layer_kwargs or {})
    rotate = isinstance(layer, str) and "init" not in layer_kwargs
    mixer = partial(
        conditional_linear,
        context_dim=context_dim,
        layer=layer,
        role=role,
        hidden_dims=context_hidden_dims,
        log_scale_bound=log_scale_bound,
    )
    coupling_kwargs = dict(coupling_kwargs or {})
    parts: list = []
    for block in range(num_blocks + 1):
        extra = {"init": "orthogonal"} if rotate and block > 0 else {}
        parts.append(mixer(input_dim, **layer_kwargs, **extra))
        if block == num_blocks:
            break
        if coupling == "affine":
            parts.append(
                conditional_affine_coupling(
                    input_dim, context_dim, hidden_dims=hidden_dims, **coupling_kwargs
                )
            )
        else:
            spline = conditional_spline_autoregressive(
                input_dim, context_dim, hidden_dims=hidden_dims, **coupling_kwargs
            )
            parts.append(spline if role == "guide" else spline.inv)
    flow = ConditionalFlow(parts, role=role)
    return flow


# ------------------------------------------------------------------ images
class ConditionalChannelMixer(ConditionalStructuredLinear):
    r"""A family's channel mixer (a 1x1 convolution) with a context-dependent scale and shift
    per channel, on ``(..., C, H, W)`` images.

    .. math::

        y_{:, h, w} = e^{s(c)} \odot (W x_{:, h, w} + b) + t(c), \qquad
        \log\left|\det \tfrac{\partial y}{\partial x}\right|
            = H W \left(\log|\det W| + \textstyle\sum_{i=1}^C s_i(c)\right),

    the image form of :class:`ConditionalStructuredLinear`: every pixel's channel vector goes
    through the family's layer (:func:`~pyro_lunet.channel_mixer`), then the context's
    per-channel scale and shift, broadcast over the pixels. Contexts ``(*batch_c, C_ctx)``
    broadcast against images ``(*batch_x, C, H, W)``; the log-determinant is exact per image.
    Starts as the mixer itself (the context network's last layer is zero).

    Cost: the mixer's (one batched call over the B·H·W pixels) plus O(B C H W) and the
    context network's.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import conditional_channel_mixer
        >>> mixer = conditional_channel_mixer(3, context_dim=2, layer="butterfly")
        >>> base = dist.Normal(torch.zeros(3, 4, 4), 1.0).to_event(3)
        >>> images = dist.ConditionalTransformedDistribution(base, [mixer])
        >>> images.condition(torch.randn(5, 2)).log_prob(torch.randn(5, 3, 4, 4)).shape
        torch.Size([5])

    :param mixer: the :class:`~pyro_lunet.transforms.ChannelMixer` (any family).
    :param int context_dim: the context dimension.
    :param hidden_dims: the context network's hidden widths (as for the vector form).
    :param log_scale_bound: the soft bound on :math:`|s|` (as for the vector form).
    """

    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)

    def __init__(self, mixer, context_dim: int, hidden_dims=None, log_scale_bound=5.0):
        from .transforms.channel_mixer import ChannelMixer

        if not isinstance(mixer, ChannelMixer):
            raise ValueError(f"mixer must be a pyro_lunet ChannelMixer, got {type(mixer).__name__}")
        super().__init__(mixer.layer, context_dim, hidden_dims, log_scale_bound)
        # The mixer's tensors are its layer's, registered above as ``linear``.
        object.__setattr__(self, "mixer", mixer)

    def condition(self, context: Tensor) -> ConditionedChannelMixer:
        """The transform for ``context``: the mixer, then the context's scale and shift."""
        return ConditionedChannelMixer(self, self.check_context(context))


class ConditionedChannelMixer(ConditionedStructuredLinear):
    """A :class:`ConditionalChannelMixer` conditioned on one (batched) context."""

    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)

    def _check(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() < 3 or x.shape[-3] != self.input_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} expects images of shape (..., {self.input_dim}, H, W), got {shape}"
            )
        check_vector_input(name, x.movedim(-3, -1), self.input_dim, self.context)
        try:
            _broadcast(x.shape[:-3], self._context_batch)
        except RuntimeError:
            raise ValueError(
                f"{name} expects images whose batch shape broadcasts with the context's "
                f"{tuple(self._context_batch)}, got {tuple(x.shape)}"
            ) from None

    def _per_pixel(self) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift()
        return s[..., None, None], t[..., None, None]

    def _call(self, x: Tensor) -> Tensor:
        self._check(x)
        s, t = self._per_pixel()
        mixed, _ = self.conditional.mixer._apply_with_log_det(x, False)
        return torch.addcmul(t, s.exp(), mixed)

    def _inverse(self, y: Tensor) -> Tensor:
        self._check(y)
        s, t = self._per_pixel()
        x, _ = self.conditional.mixer._apply_with_log_det((y - t) * (-s).exp(), True)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`H W (\\log|\\det W| + \\sum_i s_i(c))`, one value per image."""
        self._before_use()
        s, _ = self._scale_shift()
        pixels = x.shape[-1] * x.shape[-2]
        shape = _broadcast(x.shape[:-3], y.shape[:-3], self._context_batch)
        return (pixels * (self.conditional.linear._log_abs_det() + s.sum(-1))).expand(shape)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return torch.Size((*_broadcast(shape[:-3], self._context_batch), *shape[-3:]))

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return self.forward_shape(shape)


def conditional_channel_mixer(
    channels: int,
    context_dim: int,
    layer: LayerSpec = "lu",
    role: Role = "density",
    hidden_dims: Sequence[int] | None = None,
    log_scale_bound: float | None = 5.0,
    **layer_kwargs,
) -> ConditionalChannelMixer:
    """A :class:`ConditionalChannelMixer` of a family's :func:`~pyro_lunet.channel_mixer`.

    ``role`` defaults to ``"density"``: an image model scores with ``_inverse``.
    """
    from .transforms.channel_mixer import channel_mixer

    mixer = channel_mixer(channels, layer=layer, role=role, **layer_kwargs)
    return ConditionalChannelMixer(mixer, context_dim, hidden_dims, log_scale_bound)
