r"""The LU-Net network: LU layers alternating with leaky softplus."""

from __future__ import annotations

from typing import Literal

from pyro.distributions.torch_transform import ComposeTransformModule

from .base import check_choice, check_input_dim
from .leaky_softplus import LeakySoftplus
from .lu import LULinear

__all__ = ["lu_net"]


def lu_net(
    input_dim: int,
    num_blocks: int,
    alpha: float = 0.1,
    bias: bool = True,
    product: Literal["forward", "inverse"] = "forward",
    init: str = "identity",
) -> ComposeTransformModule:
    r"""The LU-Net of Chan et al.: ``num_blocks`` x [LU layer, leaky softplus], then an LU layer.

    The paper's network

    .. math::

        f = A_{K+1} \circ \phi \circ A_K \circ \cdots \circ \phi \circ A_1,
        \qquad A_k(x) = L_k U_k x + b_k,

    is smooth, invertible and non-linear (a stack of linear layers alone is
    only a Gaussian). ``product`` says which direction runs :math:`f` with
    closed-form steps (triangular products, :math:`\phi`); the other runs
    :math:`f^{-1}` (triangular solves, Newton steps for :math:`\phi^{-1}`):

    * ``"forward"`` (default): sampling applies :math:`f`. For variational
      guides, e.g. ``AutoNormalizingFlow(model, partial(lu_net, num_blocks=3))``.
    * ``"inverse"``: scoring applies :math:`f`, as the paper's density model
      does (data to latent). For ``TransformedDistribution`` density models.

    Cost per layer and batch of N: O(N D^2) for the linear layers, O(N D) for
    the activations; log-determinants O(D) per layer plus O(N D).

    In low dimension prefer ``init="orthogonal"``: from the identity every
    activation acts on the data's own axes and a 2-D fit can stall near the
    best single Gaussian (the command line's ``lu-net`` uses rotations).

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import lu_net
        >>> flow = lu_net(2, num_blocks=3, product="inverse")
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
    :param str product: ``"forward"`` or ``"inverse"``, as above.
    :param init: the LU layers' ``init``.
    """
    check_input_dim(input_dim)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
    check_choice("product", product, ("forward", "inverse"))
    # Under "inverse" every piece is the inverse of the paper's piece, so the
    # same [linear, activation, ..., linear] pattern inverts to f.
    parts = [LULinear(input_dim, bias=bias, init=init, product=product)]
    for _ in range(num_blocks):
        parts.append(LeakySoftplus(alpha, inverse=product == "inverse"))
        parts.append(LULinear(input_dim, bias=bias, init=init, product=product))
    return ComposeTransformModule(parts)
