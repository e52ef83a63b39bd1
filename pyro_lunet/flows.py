r"""Ready-made flows from any layer family, for density models and variational guides.

Two builders, each returning a :class:`~pyro_lunet.Flow` (one
``TransformModule`` that runs its parts and their log-determinants in one
pass, with one cache) from base noise to data, so one line gives a density model
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

The family is picked by name (see :func:`~pyro_lunet.families` and the
registry :data:`~pyro_lunet.FAMILIES`) or by a factory ``input_dim -> TransformModule``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pyro.distributions import TransformModule
from pyro.distributions.transforms import spline_coupling

from .transforms.base import ROLES, Role, check_choice, check_input_dim
from .transforms.flow import Flow
from .transforms.leaky_softplus import LeakySoftplus
from .transforms.packed_nn import packed_affine_coupling
from .transforms.registry import FAMILIES, Family

__all__ = ["LAYERS", "activation_flow", "coupling_flow", "layer_factory"]

LayerSpec = str | Callable[[int], TransformModule]

#: Deprecated alias of :data:`~pyro_lunet.FAMILIES` (kept for one release): the
#: registry itself, a read-only mapping ``name -> Family``.
LAYERS = FAMILIES

# The deprecated direction keywords (LU's ``product``, SNF's ``exact``): a
# family factory given one of them gets no ``role`` from the builder, and warns.
_LEGACY_DIRECTION_KEYWORDS = ("product", "exact")


def _family(layer: str) -> Family:
    if isinstance(layer, str) and layer in FAMILIES:
        return FAMILIES[layer]
    raise ValueError(
        f"layer must be a factory or one of the available families {list(FAMILIES)}, got {layer!r}"
    )


def layer_factory(
    layer: LayerSpec, role: Role = "guide", **kwargs
) -> Callable[[int], TransformModule]:
    """The factory ``input_dim -> layer`` for a family name or a factory.

    For a registered family name (:func:`~pyro_lunet.families`), the family's
    factory with ``role`` and ``kwargs``. A callable is returned as is
    (``kwargs`` must then be empty: bind them with ``functools.partial``).

    :raises ValueError: for an unknown name; the message lists the available names.
    """
    return _layer_factory(layer, role, kwargs)


def _layer_factory(layer: LayerSpec, role: str, kwargs: dict) -> Callable[[int], TransformModule]:
    check_choice("role", role, ROLES)
    if "role" in kwargs:
        raise ValueError(
            f"role is the builder's keyword: pass role={kwargs['role']!r} to the builder, "
            "not among the layer keywords"
        )
    if callable(layer):
        if kwargs:
            raise ValueError(
                f"layer keywords {sorted(kwargs)} apply to named families only; "
                "bind them into the factory (functools.partial)"
            )
        return layer
    family = _family(layer)
    if not any(k in kwargs for k in _LEGACY_DIRECTION_KEYWORDS):
        kwargs = {"role": role, **kwargs}

    def make(input_dim: int) -> TransformModule:
        return family.factory(input_dim, **kwargs)

    make.__name__ = f"{family.name}_layer"
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
) -> Flow:
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
    closed-form pieces: each layer's cheap or exact side (the builder passes
    ``role`` to every layer) and :math:`\phi` instead of its Newton-solved inverse.

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
    :param layer: a registered family name (:func:`~pyro_lunet.families`) or a factory
        ``input_dim -> TransformModule``.
    :param str role: ``"guide"`` or ``"density"``, as above.
    :param float alpha: the activation's slope, in (0, 1).
    :param dict layer_kwargs: keywords for a named family's factory.
    """
    check_input_dim(input_dim)
    _check_blocks(num_blocks)
    make = _layer_factory(layer, role, dict(layer_kwargs or {}))
    inverse = role == "density"
    # Under "density" each activation is phi^-1 in the forward direction, so
    # the scoring direction runs phi in closed form; the layers' orientation
    # comes from their own role.
    parts = [make(input_dim)]
    for _ in range(num_blocks):
        parts.append(LeakySoftplus(alpha, inverse=inverse))
        parts.append(make(input_dim))
    return Flow(parts, input_dim=input_dim)


def coupling_flow(
    input_dim: int,
    num_blocks: int = 4,
    layer: LayerSpec = "lu",
    role: Role = "guide",
    coupling: Literal["affine", "spline"] = "affine",
    hidden_dims: list[int] | None = None,
    layer_kwargs: dict | None = None,
    coupling_kwargs: dict | None = None,
) -> Flow:
    r"""Glow-style: ``num_blocks`` x [mixer, coupling layer], then a mixer.

    Each mixer is a layer of the chosen family; each coupling layer is
    Pyro's own (:class:`~pyro.distributions.transforms.AffineCoupling` with
    :func:`~pyro.distributions.transforms.affine_coupling`'s defaults, its
    network's weights in one tensor (:class:`~pyro_lunet.transforms.packed_nn.PackedDenseNN`:
    Pyro's SVI pays per parameter tensor), or
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
    :param layer: a registered family name (:func:`~pyro_lunet.families`) or a factory
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
    make = _layer_factory(layer, role, layer_kwargs)
    make_mixer = make
    if isinstance(layer, str) and "init" not in layer_kwargs:
        make_mixer = _layer_factory(layer, role, {"init": "orthogonal", **layer_kwargs})
    # Affine: Pyro's coupling with its network's weights in one tensor (SVI steps pay per
    # parameter tensor); the same map, and Pyro-network checkpoints still load.
    make_coupling = packed_affine_coupling if coupling == "affine" else spline_coupling
    parts = []
    for block in range(num_blocks):
        parts.append(make(input_dim) if block == 0 else make_mixer(input_dim))
        parts.append(make_coupling(input_dim, hidden_dims=hidden_dims, **(coupling_kwargs or {})))
    parts.append(make_mixer(input_dim) if num_blocks else make(input_dim))
    return Flow(parts, input_dim=input_dim)
