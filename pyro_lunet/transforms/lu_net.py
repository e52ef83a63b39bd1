r"""The LU-Net network: LU layers alternating with leaky softplus."""

from __future__ import annotations

from typing import Literal

from .base import Role, resolve_role
from .flow import Flow

__all__ = ["lu_net"]


def lu_net(
    input_dim: int,
    num_blocks: int,
    alpha: float = 0.1,
    bias: bool = True,
    role: Role | None = None,
    init: str = "identity",
    *,
    product: Literal["forward", "inverse"] | None = None,
) -> Flow:
    r"""The LU-Net of Chan et al.: ``num_blocks`` x [LU layer, leaky softplus], then an LU layer.

    The paper's network

    .. math::

        f = A_{K+1} \circ \phi \circ A_K \circ \cdots \circ \phi \circ A_1,
        \qquad A_k(x) = L_k U_k x + b_k,

    is smooth, invertible and non-linear (a stack of linear layers alone is
    only a Gaussian). It is :func:`~pyro_lunet.activation_flow` with
    ``layer="lu"``. ``role`` says which direction runs :math:`f` with
    closed-form steps (triangular products, :math:`\phi`); the other runs
    :math:`f^{-1}` (triangular solves, Newton steps for :math:`\phi^{-1}`):

    * ``"guide"`` (default): sampling applies :math:`f`. For variational
      guides, e.g. ``AutoNormalizingFlow(model, partial(lu_net, num_blocks=3))``.
    * ``"density"``: scoring applies :math:`f`, as the paper's density model
      does (data to latent). For ``TransformedDistribution`` density models.

    Cost per layer and batch of N: O(N D^2) for the linear layers, O(N D) for
    the activations; log-determinants O(D) per layer plus O(N D).

    In low dimension prefer ``init="orthogonal"``: from the identity every
    activation acts on the data's own axes and a 2-D fit can stall near the
    best single Gaussian (the command line's ``lu-net`` uses rotations).

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import lu_net
        >>> flow = lu_net(2, num_blocks=3, role="density")
        >>> model = dist.TransformedDistribution(
        ...     dist.Normal(torch.zeros(2), 1.0).to_event(1), flow)
        >>> model.log_prob(torch.randn(10, 2)).shape
        torch.Size([10])

    Reference: Chan, Penquitt, Gottschalk, "LU-Net: Invertible Neural
    Networks Based on Matrix Factorization", IJCNN 2023, arXiv:2302.10524.
    The paper's code writes the Gaussian constant with log(pi) for
    log(2 pi) and detaches the activation's log-determinant; neither is
    reproduced here.

    :param int input_dim: the dimension D.
    :param int num_blocks: the number K of [LU, activation] blocks (>= 0).
    :param float alpha: the activation's slope, in (0, 1); the paper uses 0.1.
    :param bool bias: whether the LU layers learn biases.
    :param str role: ``"guide"`` (default) or ``"density"``, as above.
    :param init: the LU layers' ``init``.
    :param str product: deprecated spelling of ``role`` (``"forward"`` is
        ``role="guide"``, ``"inverse"`` ``role="density"``); warns, and is
        removed in the next release.
    """
    from ..flows import activation_flow  # flows imports this package: import on use

    role = resolve_role(role, "guide", product=product)
    return activation_flow(
        input_dim, num_blocks, layer="lu", role=role, alpha=alpha,
        layer_kwargs={"bias": bias, "init": init},
    )  # fmt: skip
