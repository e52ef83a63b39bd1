r"""pyro-lunet layers as zuko transforms (optional: needs ``pip install 'pyro-lunet[zuko]'``).

zuko builds a flow from *lazy transforms*: modules whose ``forward(c)``
returns a :class:`torch.distributions.Transform` for a context ``c`` (or
``None``). zuko's transforms map **data to noise** (``log_prob`` runs the
forward direction, sampling its inverse), the opposite of Pyro's convention,
so each adapter here hands zuko the *inverse* of a pyro-lunet transform: the
layer's scoring direction (``_inverse``) becomes zuko's forward. With
``role="density"`` (the default here) that is each family's cheap or exact
side, which is what a density model spends its time on.

* :class:`StructuredLinearTransform`: one layer of any family, conditional
  (``context > 0``: :class:`~pyro_lunet.conditional.ConditionalStructuredLinear`)
  or not, in one line::

      flow = zuko.flows.Flow(
          [StructuredLinearTransform(5, context=3, layer="butterfly"),
           zuko.flows.MaskedAutoregressiveTransform(5, 3)],
          zuko.flows.UnconditionalDistribution(
              zuko.distributions.DiagNormal, torch.zeros(5), torch.ones(5), buffer=True),
      )

* :class:`PyroLazyTransform` (or :func:`to_zuko`): any Pyro transform module
  or conditional transform module (a pyro-lunet builder's flow, e.g.
  :func:`~pyro_lunet.conditional_flow`) as a zuko lazy transform.

And back: ``pyro.contrib.zuko.ZukoToPyro(flow(c))`` is a Pyro distribution,
for ``pyro.sample`` in a model or guide.
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    from zuko.lazy import LazyTransform
except ImportError as error:  # pragma: no cover - exercised only without zuko
    raise ImportError(
        "pyro_lunet.zuko needs zuko; install it with: pip install 'pyro-lunet[zuko]'"
    ) from error

import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform

from .conditional import LayerSpec, conditional_linear
from .flows import layer_factory
from .transforms.base import Role, check_input_dim, check_positive_int

__all__ = ["PyroLazyTransform", "StructuredLinearTransform", "to_zuko"]


class _EventView(Transform):
    """A transform seen by zuko: the same map, with shape maps on event shapes only.

    A conditioned pyro-lunet layer broadcasts its context's batch shape in
    ``forward_shape`` (so that Pyro's ``TransformedDistribution`` gets the
    batch shape of a batch of contexts); zuko passes event shapes alone there
    and expands its base to the context's batch itself.
    """

    bijective = True

    def __init__(self, transform: Transform):
        super().__init__(cache_size=0)
        self.transform = transform
        self.domain = transform.domain
        self.codomain = transform.codomain

    def __call__(self, x: Tensor) -> Tensor:
        return self.transform(x)

    @property
    def inv(self) -> Transform:
        return _EventView(self.transform.inv)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.transform.log_abs_det_jacobian(x, y)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return torch.Size(shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return torch.Size(shape)

    def __repr__(self) -> str:
        return f"{type(self.transform).__name__}({self.transform})"


class PyroLazyTransform(LazyTransform):
    r"""A Pyro transform module, conditional or not, as a zuko lazy transform.

    ``forward(c)`` returns :math:`f_c^{-1}` (data to noise, zuko's direction)
    where :math:`f_c` is ``transform.condition(c)`` for a
    :class:`~pyro.distributions.ConditionalTransformModule` and ``transform``
    itself otherwise (which then ignores ``c``). The module's parameters are
    this module's, so ``flow.parameters()`` trains them.

    Cost: that of the wrapped transform's scoring direction for ``log_prob``,
    of its sampling direction for ``sample``.

    Example::

        >>> import torch, zuko
        >>> from pyro_lunet import conditional_flow
        >>> from pyro_lunet.zuko import PyroLazyTransform
        >>> flow = zuko.flows.Flow(
        ...     PyroLazyTransform(conditional_flow(3, 2, num_blocks=1, role="density")),
        ...     zuko.flows.UnconditionalDistribution(
        ...         zuko.distributions.DiagNormal, torch.zeros(3), torch.ones(3), buffer=True))
        >>> c = torch.randn(6, 2)
        >>> flow(c).log_prob(torch.randn(6, 3)).shape
        torch.Size([6])

    Reference: Rozet et al., zuko (https://github.com/probabilists/zuko),
    for the lazy-transform convention.

    :param transform: a :class:`~pyro.distributions.TransformModule` or a
        :class:`~pyro.distributions.ConditionalTransformModule` (noise to data).
    """

    def __init__(self, transform: TransformModule | ConditionalTransform):
        super().__init__()
        if not isinstance(transform, (Transform, ConditionalTransform)) or not isinstance(
            transform, torch.nn.Module
        ):
            raise ValueError(
                "transform must be a Pyro TransformModule or ConditionalTransformModule, "
                f"got {type(transform).__name__}"
            )
        self.transform = transform
        self.conditional = isinstance(transform, ConditionalTransform)

    def forward(self, c: Tensor | None = None) -> Transform:
        """The transform from data to noise for context ``c``."""
        if not self.conditional:
            return self.transform.inv
        if c is None:
            raise ValueError(
                f"{type(self.transform).__name__} is conditional: expected a context tensor, "
                "got None"
            )
        return _EventView(self.transform.condition(c).inv)


def to_zuko(transform: TransformModule | ConditionalTransform) -> PyroLazyTransform:
    """``PyroLazyTransform(transform)``: a Pyro (conditional) transform module for zuko."""
    return PyroLazyTransform(transform)


class StructuredLinearTransform(PyroLazyTransform):
    r"""One structured layer of any family, as a zuko lazy transform.

    In zuko's direction (data :math:`x` to noise :math:`z`), unconditional
    (``context=0``): :math:`z = W^{-1}(x - b)`; conditional
    (``context=C > 0``, see
    :class:`~pyro_lunet.conditional.ConditionalStructuredLinear`):

    .. math::

        z = W^{-1}\bigl(e^{-s(c)} \odot (x - t(c)) - b\bigr), \qquad
        \log\left|\det \tfrac{\partial z}{\partial x}\right|
            = -\log|\det W| - \textstyle\sum_i s_i(c).

    The names follow zuko's (``features``, ``context``, ``hidden_features``).
    ``role="density"`` (default) puts the family's cheap or exact side on
    zuko's forward direction (``log_prob``); ``role="guide"`` on sampling.

    Cost: the family's solve (``log_prob``) or product (sampling) per row,
    plus O(D) and the context network for a conditional layer.

    Example::

        >>> import torch, zuko
        >>> from pyro_lunet.zuko import StructuredLinearTransform
        >>> flow = zuko.flows.Flow(
        ...     [StructuredLinearTransform(4, context=2, layer="butterfly"),
        ...      zuko.flows.MaskedAutoregressiveTransform(4, 2)],
        ...     zuko.flows.UnconditionalDistribution(
        ...         zuko.distributions.DiagNormal, torch.zeros(4), torch.ones(4), buffer=True))
        >>> c = torch.randn(2)
        >>> flow(c).sample((5,)).shape
        torch.Size([5, 4])

    References: Rozet et al., zuko; the family's paper (see
    :mod:`pyro_lunet.transforms`).

    :param int features: the dimension D.
    :param int context: the context dimension C (0: unconditional).
    :param layer: a family name (:func:`~pyro_lunet.families`) or a factory.
    :param str role: ``"density"`` (default) or ``"guide"``.
    :param hidden_features: the context network's hidden widths (conditional only).
    :param layer_kwargs: keywords for the family's factory.
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        layer: LayerSpec = "lu",
        role: Role = "density",
        hidden_features: Sequence[int] | None = None,
        **layer_kwargs,
    ):
        check_input_dim(features)
        check_positive_int("context", context, minimum=0)
        if context:
            module = conditional_linear(
                features,
                context,
                layer=layer,
                role=role,
                hidden_dims=hidden_features,
                **layer_kwargs,
            )
        else:
            if hidden_features is not None:
                raise ValueError(
                    f"hidden_features applies to a conditional layer (context > 0), "
                    f"got context=0 and hidden_features={hidden_features!r}"
                )
            module = layer_factory(layer, role=role, **layer_kwargs)(features)
        super().__init__(module)
        self.features = features
        self.context = context
