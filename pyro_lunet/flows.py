r"""Ready-made flows from any layer family, for density models and variational guides.

Two builders, each returning a
:class:`~pyro.distributions.torch_transform.ComposeTransformModule` from base
noise to data, so one line gives a density model
(``TransformedDistribution(base, flow)``) or a guide
(``AutoNormalizingFlow(model, partial(builder, ...))``):

* :func:`activation_flow`: the family's linear layers alternating with the
  invertible leaky softplus (LU-Net with any family);
* :func:`coupling_flow`: Pyro's own affine or spline coupling layers with the
  family's layer as the learned mixer between them (Glow-style, a structured
  layer in place of a fixed permutation).

A stack of linear layers alone is only an affine map of the base noise, i.e.
a Gaussian, however many layers it has: use these builders (or
:func:`~pyro_lunet.lu_net`) for anything non-Gaussian.

The family is picked by name (see :data:`LAYERS`) or by a factory
``input_dim -> TransformModule``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal

from pyro.distributions import TransformModule
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import affine_coupling, spline_coupling

from .transforms.base import check_choice, check_input_dim
from .transforms.leaky_softplus import LeakySoftplus

__all__ = ["LAYERS", "activation_flow", "coupling_flow", "layer_factory"]

Role = Literal["guide", "density"]
LayerSpec = str | Callable[[int], TransformModule]

#: The layer families by name: ``name -> (module, factory, direction keyword)``.
#: The direction keyword (or ``None`` for a family whose two directions cost
#: the same) takes ``"forward"`` for guides and ``"inverse"`` for density
#: models: the value that puts the family's cheap or exact side where each
#: spends its time (sampling for a guide, scoring for a density model).
#: A family joins with one line here.
_T = "pyro_lunet.transforms."
LAYERS: dict[str, tuple[str, str, str | None]] = {
    "lu": (_T + "lu", "lu_linear", "product"),
    "butterfly": (_T + "butterfly", "butterfly_linear", None),
    "circulant": (_T + "circulant", "circulant_diagonal_linear", None),
    "rank_one": (_T + "rank_one", "rank_one_updated_linear", None),
    "self_normalizing": (_T + "self_normalizing", "self_normalizing_linear", "exact"),
}

_ROLES = ("guide", "density")


def _load(name: str):
    module, attr, _ = LAYERS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _available() -> list[str]:
    return [name for name in LAYERS if _load(name) is not None]


def layer_factory(
    layer: LayerSpec, role: Role = "guide", **kwargs
) -> Callable[[int], TransformModule]:
    """The factory ``input_dim -> layer`` for a family name or a factory.

    For a name from :data:`LAYERS`, the family's factory with ``kwargs`` and,
    where the family has one, its direction keyword set for ``role``
    (``kwargs`` win). A callable is returned as is (``kwargs`` must then be
    empty: bind them with ``functools.partial``).

    :raises ValueError: for an unknown name or one whose module cannot be
        imported; the message lists the available names.
    """
    check_choice("role", role, _ROLES)
    if callable(layer):
        if kwargs:
            raise ValueError(
                f"layer keywords {sorted(kwargs)} apply to named families only; "
                "bind them into the factory (functools.partial)"
            )
        return layer
    factory = _load(layer) if isinstance(layer, str) and layer in LAYERS else None
    if factory is None:
        raise ValueError(
            f"layer must be a factory or one of the available families {_available()}, "
            f"got {layer!r}"
        )
    direction = LAYERS[layer][2]
    if direction is not None:
        kwargs = {direction: "forward" if role == "guide" else "inverse", **kwargs}

    def make(input_dim: int) -> TransformModule:
        return factory(input_dim, **kwargs)

    make.__name__ = f"{layer}_layer"
    return make


def _check_blocks(num_blocks) -> int:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
    return num_blocks


def activation_flow(
    input_dim: int,
    num_blocks: int = 3,
    layer: LayerSpec = "lu",
    role: Role = "guide",
    alpha: float = 0.1,
    layer_kwargs: dict | None = None,
) -> ComposeTransformModule:
    r"""``num_blocks`` x [linear layer, leaky softplus], then a linear layer, from any family.

    .. math::

        f = A_{K+1} \circ \phi \circ A_K \circ \cdots \circ \phi \circ A_1,
        \qquad \phi(x) = a x + (1 - a)\,\mathrm{softplus}(x),

    with every :math:`A_k` a fresh layer of the chosen family. With
    ``layer="lu"`` this is LU-Net (:func:`~pyro_lunet.lu_net`). The
    activations make the map non-linear; without them (``num_blocks=0``) the
    flow is one affine map and its distribution a Gaussian.

    ``role`` orients the flow. ``"guide"`` (default): sampling (``_call``)
    applies :math:`f` in closed form, as variational guides need, e.g.
    ``AutoNormalizingFlow(model, partial(activation_flow, layer="butterfly"))``.
    ``"density"``: scoring (``_inverse``, what ``log_prob`` runs) applies the
    closed-form pieces: each layer's cheap or exact side (LU's ``product``,
    SNF's ``exact``) and :math:`\phi` instead of its Newton-solved inverse.

    Cost per batch of N: the family's matrix-vector cost per layer, O(N D)
    per activation (closed form one way, a few Newton steps the other).

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import activation_flow
        >>> flow = activation_flow(3, num_blocks=2, layer="circulant", role="density")
        >>> model = dist.TransformedDistribution(
        ...     dist.Normal(torch.zeros(3), 1.0).to_event(1), flow)
        >>> model.log_prob(torch.randn(5, 3)).shape
        torch.Size([5])

    :param int input_dim: the dimension D.
    :param int num_blocks: the number K of [linear, activation] blocks (>= 0).
    :param layer: a family name from :data:`LAYERS` or a factory
        ``input_dim -> TransformModule``.
    :param str role: ``"guide"`` or ``"density"``, as above.
    :param float alpha: the activation's slope, in (0, 1).
    :param dict layer_kwargs: keywords for a named family's factory.
    """
    check_input_dim(input_dim)
    _check_blocks(num_blocks)
    make = layer_factory(layer, role, **(layer_kwargs or {}))
    inverse = role == "density"
    # Under "density" each activation is phi^-1 in the forward direction, so
    # the scoring direction runs phi in closed form; the layers' orientation
    # comes from their direction keyword.
    parts = [make(input_dim)]
    for _ in range(num_blocks):
        parts.append(LeakySoftplus(alpha, inverse=inverse))
        parts.append(make(input_dim))
    return ComposeTransformModule(parts)


def coupling_flow(
    input_dim: int,
    num_blocks: int = 4,
    layer: LayerSpec = "lu",
    role: Role = "guide",
    coupling: Literal["affine", "spline"] = "affine",
    hidden_dims: list[int] | None = None,
    layer_kwargs: dict | None = None,
    coupling_kwargs: dict | None = None,
) -> ComposeTransformModule:
    r"""Glow-style: ``num_blocks`` x [mixer, coupling layer], then a mixer.

    Each mixer is a layer of the chosen family; each coupling layer is
    Pyro's own (:func:`~pyro.distributions.transforms.affine_coupling` or
    :func:`~pyro.distributions.transforms.spline_coupling`), which transforms
    the last :math:`D - \lfloor D/2 \rfloor` coordinates conditioned on the
    first :math:`\lfloor D/2 \rfloor`. The learned mixers decide which
    directions condition which, where Glow's 1x1 convolution (and RealNVP's
    fixed permutation) would. The last mixer, with its bias, lets the flow
    end in any affine map, so ``num_blocks=0`` is a Gaussian (the coupling
    layers are what makes the flow non-Gaussian).

    Initialization (named families, unless ``layer_kwargs`` sets ``init``):
    the first mixer starts at the identity, so the first coupling layer
    conditions the last coordinates on the first ones in the order given (an
    ``AutoNormalizingFlow`` lists a model's sites in order, so local variables
    of a hierarchical model start conditioned on the global ones that come
    before them); every later mixer starts from ``init="orthogonal"`` (a
    Haar-random rotation, as Glow does), so the coupling layers do not all
    split the same coordinates. ``role`` orients the mixers as in
    :func:`activation_flow`; both coupling directions are closed-form.

    Cost per batch of N: the family's matrix-vector cost per mixer and the
    coupling networks' (an MLP on :math:`\lfloor D/2 \rfloor` inputs).

    Example::

        >>> from functools import partial
        >>> import pyro, torch, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> from pyro_lunet import coupling_flow
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
        >>> guide = AutoNormalizingFlow(model, partial(coupling_flow, layer="butterfly"))
        >>> guide()["z"].shape
        torch.Size([4])

    :param int input_dim: the dimension D (at least 2).
    :param int num_blocks: the number K of [mixer, coupling] blocks (>= 0).
    :param layer: a family name from :data:`LAYERS` or a factory
        ``input_dim -> TransformModule``.
    :param str role: ``"guide"`` or ``"density"``.
    :param str coupling: ``"affine"`` or ``"spline"``.
    :param hidden_dims: the coupling networks' hidden widths (Pyro's default,
        ``[10 * D]``, when ``None``).
    :param dict layer_kwargs: keywords for a named family's factory.
    :param dict coupling_kwargs: more keywords for the coupling factory
        (e.g. ``count_bins``, ``bound`` for splines).
    """
    check_input_dim(input_dim)
    _check_blocks(num_blocks)
    check_choice("coupling", coupling, ("affine", "spline"))
    if input_dim < 2 and num_blocks > 0:
        raise ValueError(f"coupling layers need input_dim >= 2, got {input_dim}")
    layer_kwargs = dict(layer_kwargs or {})
    make = layer_factory(layer, role, **layer_kwargs)
    make_mixer = make
    if isinstance(layer, str) and "init" not in layer_kwargs:
        make_mixer = layer_factory(layer, role, init="orthogonal", **layer_kwargs)
    make_coupling = affine_coupling if coupling == "affine" else spline_coupling
    parts = []
    for block in range(num_blocks):
        parts.append(make(input_dim) if block == 0 else make_mixer(input_dim))
        parts.append(make_coupling(input_dim, hidden_dims=hidden_dims, **(coupling_kwargs or {})))
    parts.append(make_mixer(input_dim) if num_blocks else make(input_dim))
    return ComposeTransformModule(parts)
