r"""Self-normalizing linear layers (SNF): a dense matrix trained through its learned inverse."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..fingerprint import parameter_fingerprint
from ._fused import KERNEL_MAX_DIM, Kernel
from .base import (
    InvertibleLinear,
    LegacyDirection,
    Role,
    check_positive_int,
    check_square_matrix,
    haar_orthogonal,
    resolve_role,
)
from .registry import register_family

__all__ = ["SelfNormalizingLinear", "self_normalizing_linear"]


class _Record:
    """The reconstruction term of a layer's last training forward.

    ``term`` is an output of :class:`_SelfNormalizingProduct`; it is valid
    while the parameters keep the versions in ``key`` and no backward pass
    has gone through its node (``spent``, shared with the node, which holds
    nothing else of the layer's).
    """

    __slots__ = ("term", "key", "spent")

    def __init__(self, term: Tensor, key: tuple, spent: list[bool]):
        self.term, self.key, self.spent = term, key, spent


class _Tracker:
    """Mutable state a layer shares with its ``with_cache`` views.

    ``steps`` counts the training-mode log-det evaluations since the last
    exact anchor; ``record`` is the last training forward's reconstruction
    term (dropped on copying and pickling: it holds an autograd graph).
    """

    def __init__(self):
        self.steps = 0
        self.record: _Record | None = None

    def __getstate__(self) -> dict:
        return {"steps": self.steps, "record": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


# Fewer random probes than this make the term's gradient too noisy: a
# one-particle SVI guide (N = 1) at D = 4 ended with covariance errors of
# 0.37-0.61 on one probe, 0.14-0.17 on exact (identity) probes.
_MIN_PROBES = 32


def _probes(num_rows: int, W: Tensor) -> tuple[Tensor | None, float]:
    r"""Probe vectors for :math:`\|R W - I\|_F^2` and the weight that makes their mean exact.

    With :math:`k = \max(N, 32)`: ``(None, 1)`` stands for the identity
    probes (the exact norm, three D x D x D GEMMs) when :math:`D \le k`, so
    the term never costs more than the batch's own GEMMs or a small fixed
    amount; otherwise k standard normal rows, weighted 1/k, whose mean
    :math:`\tfrac1k \sum_i \|(R W - I) p_i\|^2` is unbiased.
    """
    dim, count = W.shape[0], max(num_rows, _MIN_PROBES)
    if dim <= count:
        return None, 1.0
    return torch.randn(count, dim, dtype=W.dtype, device=W.device), 1.0 / count


_IDENTITIES: dict[tuple, Tensor] = {}


def _identity(like: Tensor) -> Tensor:
    """The ``(D, D)`` identity in ``like``'s dtype and device, made once (never written to)."""
    key = (like.shape[0], like.dtype, like.device)
    eye = _IDENTITIES.get(key)
    if eye is None:
        eye = _IDENTITIES[key] = torch.eye(key[0], dtype=key[1], device=key[2])
    return eye


def _reconstruction_error(probes: Tensor | None, W: Tensor, RT: Tensor) -> tuple[Tensor, Tensor]:
    """``(Q, E)``: rows ``Q = P W^T`` and ``E = Q R^T - P`` = rows of ``(R W - I) p``."""
    if probes is None:  # P = I
        image, probes = W.t(), _identity(W)
    else:
        image = torch.mm(probes, W.t())
    return image, torch.addmm(probes, image, RT, beta=-1)  # Q R^T - P, one op


def _squared_norm(error: Tensor) -> Tensor:
    r""":math:`\|E\|_F^2` as one op."""
    flat = error.reshape(-1)
    return torch.dot(flat, flat)


class _SelfNormalizingProduct(torch.autograd.Function):
    r"""Rows of ``W u`` with the self-normalizing gradients, and the reconstruction term.

    Takes ``RT = R^T``, the reconstruction weight ``lam`` (``None`` for
    none) and probes ``P`` (``None`` for the identity; see :func:`_probes`)
    with their weight ``c``. Forward: ``z = u W^T`` and ``rec = lam c |E|^2``
    with ``E = P W^T R^T - P``, an estimate of :math:`\lambda \|R W -
    I\|_F^2`. Backward, for upstream gradients ``G = dL/dz`` and ``g =
    dL/drec``, ``S = 2 g lam c E``, ``Q = P W^T``:

    * ``u``: ``G W``, the exact gradient (so earlier layers and the bias
      receive exact gradients);
    * ``W``: ``(G / 2)^T u + (S R)^T P``;
    * ``RT``: ``z^T (-G W / 2) + Q^T S``, the transpose of R's gradient.

    The reconstruction gradient is part of the method, so the node applies it
    itself: where the loss did not use ``rec`` (``g`` is ``None``) it takes
    ``g = 1``, and any loss, any ELBO and any plain loop trains the layer
    correctly; a loss that adds ``rec`` (through ``penalty()``) sets ``g``,
    its own weight, instead. The halves are the paper's: ``W`` carries half
    of ``log p_f``'s data term, ``R`` half of ``log p_g``'s with ``R^-1``
    replaced by ``W``; the ``log|det|`` halves come from
    :class:`_SurrogateLogDet`. GEMMs: 1 forward and 3 backward of ``N x D x
    D`` for the data, plus 3 of ``min(max(N, 32), D) x D x D`` for the term.
    """

    @staticmethod
    def forward(ctx, u, W, RT, lam: float | None, probes: Tensor | None, scale: float, spent):
        z, rec, (image, error) = _product(u, W, RT, lam, probes, scale)
        ctx.save_for_backward(u, z, probes, image, error, W, RT)
        ctx.weight, ctx.spent = None if lam is None else lam * scale, spent
        ctx.set_materialize_grads(False)
        return z, rec

    @staticmethod
    def backward(ctx, grad_z: Tensor | None, grad_rec: Tensor | None):
        u, z, probes, image, error, W, RT = ctx.saved_tensors
        ctx.spent[0] = True  # the recorded term must not be handed out again
        grad_u, grad_w, grad_rt = _product_backward(
            u, z, probes, image, error, W, RT, ctx.weight, grad_z, grad_rec
        )
        if not ctx.needs_input_grad[0]:
            grad_u = None
        return grad_u, grad_w, grad_rt, None, None, None, None


# At small D a step costs its op count, not its flops: these helpers fold every
# scale and sum they can into the GEMMs' alpha and beta (exact for the powers of
# two; the rest moves values by a rounding).
def _product(u, W, RT, lam: float | None, probes: Tensor | None, scale: float) -> tuple:
    """``(z, rec, (image, error))``: the forward of :class:`_SelfNormalizingProduct`."""
    z = torch.mm(u, W.t())
    if lam is None:  # no reconstruction term
        return z, u.new_zeros(()), (None, None)
    image, error = _reconstruction_error(probes, W, RT)
    weight = lam * scale
    rec = _squared_norm(error)
    return z, rec if weight == 1.0 else weight * rec, (image, error)


def _addmm(total: Tensor | None, a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``total + alpha a b`` (``alpha a b`` for ``None``)."""
    return torch.mm(a, b).mul_(alpha) if total is None else torch.addmm(total, a, b, alpha=alpha)


def _product_backward(
    u, z, probes, image, error, W, RT, weight, grad_z, grad_rec, grad_log_det=None,
    log_det_sign: float = 1.0,
) -> tuple:  # fmt: skip
    """``(grad_u, grad_W, grad_RT)``: the backward of :class:`_SelfNormalizingProduct`,
    for its forward's ``(u, z, probes, image, error)`` and ``weight = lam * scale``;
    with ``grad_log_det`` plus :func:`_surrogate_grads` of ``log_det_sign * grad_log_det``
    (a flow's step: the log-det and the product share one backward)."""
    grad_u = grad_w = grad_rt = None
    if grad_log_det is not None:
        grad_w, grad_rt = _surrogate_grads(grad_log_det, W, RT, log_det_sign)
    if grad_z is not None:
        grad_u = torch.mm(grad_z, W)
        grad_w = _addmm(grad_w, grad_z.t(), u, 0.5)
        grad_rt = _addmm(grad_rt, z.t(), grad_u, -0.5)
    if error is not None:
        # S = 2 g lam c E: W gets (S R)^T P = R^T S^T P, RT gets Q^T S
        scaled = error if grad_rec is None else error * grad_rec
        alpha = 2.0 * weight
        if probes is None:
            grad_w = _addmm(grad_w, RT, scaled.t(), alpha)
        else:
            grad_w = _addmm(grad_w, torch.mm(RT, scaled.t()), probes, alpha)
        # Q^T = W for the identity probes (Q = W^T): no transposed view
        grad_rt = _addmm(grad_rt, W if probes is None else image.t(), scaled, alpha)
    return grad_u, grad_w, grad_rt


class _SurrogateLogDet(torch.autograd.Function):
    r"""``value`` (a tracked or exact ``log|det W|``) with the paper's gradients.

    For an upstream gradient ``c``: ``W`` gets ``c R^T / 2`` (``R^T`` standing
    in for ``W^-T``), ``R`` gets ``-c W^T / 2`` (the gradient of
    ``-log|det R|`` with ``R^-T`` replaced by ``W^T``), so ``RT = R^T`` gets
    ``-c W / 2``. O(D^2), and with R stored transposed no transposed copy.
    """

    @staticmethod
    def forward(ctx, value: Tensor, W: Tensor, RT: Tensor) -> Tensor:
        ctx.save_for_backward(W, RT)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        W, RT = ctx.saved_tensors
        return None, *_surrogate_grads(grad, W, RT)


def _surrogate_grads(
    grad: Tensor, W: Tensor, RT: Tensor, sign: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The gradients of ``W`` and ``RT`` that :class:`_SurrogateLogDet` gives ``sign * grad``."""
    return RT * ((0.5 * sign) * grad), W * ((-0.5 * sign) * grad)


class _ExactSideKernel(Kernel):
    r"""A training forward of the exact side, its log-determinant and its term, as a flow's step.

    Rows of :math:`u W^\top + b` with :math:`u = h` (``role="guide"``, sampling) or
    :math:`(h - b) W^\top` (``subtract``: ``role="density"``, scoring), the step's
    forward log-determinant :math:`\pm` the layer's tracked :math:`\log|\det W|`
    (``log_det``, taken by the layer when it made the kernel), and the reconstruction
    term as the step's extra output (none when :math:`\lambda = 0`), which the layer
    records for :meth:`SelfNormalizingLinear.penalty`. Values and gradients are those
    of the layer's own training path, by the same functions (:func:`_product`,
    :func:`_product_backward`, :func:`_surrogate_grads`): the surrogate gradients of
    :class:`_SelfNormalizingProduct` and :class:`_SurrogateLogDet`, the term's applied
    with weight 1 unless the loss used it. Params ``(W, RT, bias)``. Cost: that path's
    GEMMs (1 + 3 of ``N x D x D``, 3 for the term), in the flow's one autograd node
    instead of three or four of its own.
    """

    def __init__(self, layer: SelfNormalizingLinear, subtract: bool, log_det: Tensor):
        self.subtract = subtract
        self.log_det = log_det
        self.lam = layer.reconstruction_weight or None
        self.extras = 0 if self.lam is None else 1
        self.tracker, self.key = layer._tracker, layer._param_key()
        self.spent = [False]  # shared with the record, as _SelfNormalizingProduct's
        self.probes: tuple[Tensor | None, float] = (None, 1.0)  # drawn by forward

    def forward(self, h, params):
        W, RT, bias = params
        u = h - bias if (self.subtract and bias is not None) else h
        self.probes = probes, scale = _probes(u.shape[0], W)
        z, rec, (image, error) = _product(u, W, RT, self.lam, probes, scale)
        out = z + bias if (bias is not None and not self.subtract) else z
        log_det = -self.log_det if self.subtract else self.log_det
        saved = (u, z, probes, image, error)
        return (out, log_det, saved, (rec,)) if self.extras else (out, log_det, saved)

    def backward(self, saved, params, grad_out, grad_log_det, needs, grad_extras=()):
        u, z, probes, image, error = saved
        W, RT, bias = params
        self.spent[0] = True  # the recorded term must not be handed out again
        if self.tracker.record is not None and self.tracker.record.spent is self.spent:
            # A spent record is never handed out, and this one's graph is the whole
            # run's (the node keeps every step's intermediates): the layer lets go.
            self.tracker.record = None
        weight = None if self.lam is None else self.lam * self.probes[1]
        grad_rec = grad_extras[0] if grad_extras else None
        if grad_log_det is not None and grad_log_det.dim():
            grad_log_det = grad_log_det.sum()
        grad_u, grad_w, grad_rt = _product_backward(
            u, z, probes, image, error, W, RT, weight, grad_out, grad_rec,
            grad_log_det, -1.0 if self.subtract else 1.0,
        )  # fmt: skip
        grad_bias = None
        if bias is not None and needs[2] and grad_out is not None:
            grad_bias = -grad_u.sum(0) if self.subtract else grad_out.sum(0)
        return grad_u, [grad_w, grad_rt, grad_bias]

    def reference(self, h, params):
        W, RT, bias = params
        u = h - bias if (self.subtract and bias is not None) else h
        probes, scale = self.probes  # the forward's
        z, rec = _SelfNormalizingProduct.apply(u, W, RT, self.lam, probes, scale, self.spent)
        out = z + bias if (bias is not None and not self.subtract) else z
        value = _SurrogateLogDet.apply(self.log_det.detach(), W, RT)
        log_det = -value if self.subtract else value
        return (out, log_det, (rec,)) if self.extras else (out, log_det)

    def receive(self, extras):
        self.tracker.record = _Record(extras[0], self.key, self.spent)


class SelfNormalizingLinear(InvertibleLinear):
    r"""A dense invertible linear layer trained through a learned inverse (SNF).

    The layer holds a dense matrix :math:`W` and a learned approximation
    :math:`R \approx W^{-1}`. One direction, the *exact side*, applies
    :math:`W`; the other, the *fast side*, applies :math:`R` (or, with
    ``approximate=False``, solves with :math:`W` exactly). ``role`` says
    which direction is which; ``weight()`` and ``log_abs_det()`` always
    describe the exact map, written in the forward direction:

    * ``role="density"`` (default, for density models, whose ``log_prob``
      runs ``_inverse``): scoring is exact, :math:`x = W (y - b)`; the layer
      is :math:`y = W^{-1} x + b`, so ``weight()`` is :math:`W^{-1}` and
      ``log_abs_det()`` is :math:`-\log|\det W|`; sampling (``_call``) applies
      :math:`R x + b`.
    * ``role="guide"`` (for variational guides, e.g. in
      ``AutoNormalizingFlow``): sampling is exact, :math:`y = W x + b`, so
      samples and their :math:`\log q` are those of :math:`W`; ``weight()``
      is :math:`W`, ``log_abs_det()`` is :math:`\log|\det W|`; scoring other
      points (``_inverse``) applies :math:`R (y - b)` in training mode.

    **Eval mode is exact in both directions**: the fast side solves with
    :math:`W` (an LU factorization memoized under ``no_grad`` until the
    parameters change) and the log-determinant is ``slogdet``'s, so
    ``log_prob`` of any point in eval mode is the exact density, whatever
    :math:`R` is.

    **Training** (training mode with grad enabled). The gradient of
    :math:`\log|\det W|`, :math:`W^{-T}`, an O(D^3) inverse, is replaced by
    :math:`R^T`, and :math:`R` is trained by the paper's objective
    :math:`\tfrac12 L(W) + \tfrac12 L(R^{-1}) + \lambda\,\|R W - I\|_F^2`
    with :math:`R^{-1}` replaced by :math:`W` in its gradient. For the exact
    side :math:`z = W u`, the upstream gradient :math:`\delta_z = \partial L
    / \partial z` and :math:`c = \partial L / \partial \log|\det W|`:

    .. math::

        \nabla_W = \tfrac12 (\delta_z u^T + c R^T), \qquad
        \nabla_R = -\tfrac12 W^T (\delta_z z^T + c I),

    plus the exact gradient of the reconstruction term; :math:`u` and the
    bias get exact gradients. When :math:`R = W^{-1}` these are exactly half
    the gradients of :math:`L` through :math:`W` and through
    :math:`R^{-1}`. Under ``no_grad`` the layer is an ordinary linear map
    (the fast side applying :math:`R` in training mode).

    **The reconstruction term is part of the method** (without it :math:`R`
    drifts away from :math:`W^{-1}` and training diverges), so the layer
    applies its gradient itself, in the backward pass of each training
    forward of the exact side: any loss, any Pyro ELBO and any plain loop
    trains it correctly with no extra code. :meth:`penalty` reports the term
    (and a loss that adds ``c * penalty()`` right after the forward sets its
    weight to :math:`c \lambda` instead).

    **A scale-free term.** The paper penalizes :math:`\mathrm{mean}_n \|R W
    u_n - u_n\|^2` on the data. Linearizing the expected updates at the
    optimum (one dimension, probes of variance :math:`s^2`) gives a Jacobian
    of determinant :math:`4\lambda s^2 - 1/2`: a stable optimum only where
    :math:`\lambda s^2 > 1/8`, so on data with a direction of small variance
    R falls behind W and the fit stalls (a layer fitted to 4096 draws of
    :math:`A z + 1`, D = 8, covariance eigenvalues from 0.013 to 16, ended
    2.3 nats above the Gaussian MLE). Here the probes are white: the term is
    :math:`\lambda \|R W - I\|_F^2`, estimated with the identity probes
    (exact) when D is at most :math:`k = \max(N, 32)` for a batch of N and
    with k standard normal probes otherwise, so the stability condition reads :math:`\lambda >
    1/8` for data of any scale and shape (the same fit ends 0.013 nats above
    the MLE with the default :math:`\lambda = 1`).

    **The log-determinant value.** In eval mode it is exact (``slogdet``,
    memoized under ``no_grad`` until the parameters change). In training
    mode it is *tracked* at O(D^2): each evaluation moves it by the
    trapezoidal step :math:`\tfrac12 \mathrm{tr}((R + R_{prev})(W -
    W_{prev}))` since the previous one (zero when nothing changed), and every
    ``anchor_every`` evaluations it is re-anchored by an exact ``slogdet``.
    Its error per update is of order :math:`\|R W - I\|\,\|\Delta W\| +
    \|\Delta W\|^3`, so a training loss curve means what it says. The
    tracking state is in ``state_dict`` (buffers ``tracked_log_det``,
    ``tracked_W``, ``tracked_RT``), so a copied or loaded layer reports the
    same values.

    Parameters: ``W``, ``RT`` (:math:`R^T`; :math:`R` is stored transposed so
    that no gradient needs a transposed copy, and ``layer.R`` is a view of
    it) and ``bias``.

    Costs for a batch of N, in :math:`N \times D \times D` GEMMs: a training
    step (forward and backward) 4, plus 3 GEMMs of :math:`\min(\max(N, 32),
    D) \times D \times D` for the reconstruction term, against 2 to 3 and an LU
    factorization plus an inverse (O(D^3)) for exact gradients; the exact
    side 1; the fast side 1 in training mode with ``approximate=True``,
    else an LU factorization (O(D^3), memoized under ``no_grad``) and two
    triangular solves. Training-mode ``log_abs_det`` O(D^2); eval-mode
    O(D^3) once per parameter value. ``weight()`` for ``role="density"``,
    :meth:`sync_inverse` and a :meth:`penalty` computed afresh O(D^3).
    Inside a :class:`~pyro_lunet.Flow`, training with grad enabled at D below
    a few hundred, the exact side with its bias, log-determinant and term is
    one step of the flow's single autograd node: the same GEMMs, values and
    gradients, without the three to four autograd nodes of its own.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> import pyro_lunet
        >>> from pyro_lunet import self_normalizing_linear
        >>> _ = torch.manual_seed(0)
        >>> layer = self_normalizing_linear(3)      # role="density": a density model
        >>> flow = dist.TransformedDistribution(
        ...     dist.Normal(torch.zeros(3), 1.0).to_event(1), [layer])
        >>> opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        >>> for _ in range(200):                    # any loss: no penalty needed
        ...     opt.zero_grad()
        ...     (-flow.log_prob(2 * torch.randn(64, 3)).mean()).backward()
        ...     opt.step()
        >>> bool((layer.R @ layer.W - torch.eye(3)).abs().max() < 0.1)  # R follows W^-1
        True
        >>> flow.sample((5,)).shape                 # fast sampling: R z + b
        torch.Size([5, 3])
        >>> _ = layer.eval()                        # exact log|det| from here on
        >>> bool(torch.isclose(layer.log_abs_det(), -torch.linalg.slogdet(layer.W)[1]))
        True

    Reference: Keller, Peters, Jaini, Hoogeboom, Forré, Welling, "Self
    Normalizing Flows", ICML 2021, arXiv:2011.07248.

    Differences from the paper: (i) with ``role="density"`` the bias sits on
    the data side of the scoring map, :math:`z = W(x - b)` (the paper's
    :math:`W x + b'` with :math:`b' = -W b`: the same family), so that every
    layer of the library reads :math:`y = \mathrm{weight}()\, x + b`; (ii)
    the training-mode log-determinant is tracked rather than left
    uncomputed; (iii) the reconstruction term is :math:`\lambda \|R W -
    I\|_F^2` (white probes, see above) rather than the data's, and its
    gradient is fused into the layer's backward rather than a separate
    backward call; (iv) ``init="identity"`` adds noise of standard
    deviation :math:`0.01/\sqrt{D}` to the identity. As in the paper,
    :math:`W` is a free dense matrix, so unlike the library's other layers
    it is not invertible by construction: the :math:`\log|\det W|` term of
    the likelihood keeps it away from singular matrices, and a singular
    :math:`W` would show as an infinite eval-mode log-determinant.

    :param int input_dim: the dimension D.
    :param bool bias: whether to learn a bias.
    :param str role: ``"density"`` (default; scoring applies :math:`W`
        exactly, for density models) or ``"guide"`` (sampling applies
        :math:`W` exactly, for guides).
    :param float reconstruction_weight: :math:`\lambda` (the paper uses 1
        for dense layers; stable above 1/8); 0 disables the term.
    :param bool approximate: whether the fast side applies :math:`R` in
        training mode (default) or solves with :math:`W` exactly; in eval
        mode it always solves. May be changed at any time.
    :param init: ``"identity"`` (default; plus small noise), ``"orthogonal"``
        (Haar-random), or a ``(D, D)`` tensor, the initial :math:`W`.
        :math:`R` starts as :math:`W^{-1}` to float precision.
    :param int anchor_every: training-mode log-det evaluations between exact
        re-anchorings.
    :param int cache_size: 0 or 1, as for Pyro's transforms.
    :param str exact: deprecated spelling of ``role`` (``"forward"`` is
        ``role="guide"``, ``"inverse"`` ``role="density"``); warns, and is
        removed in the next release.
    """

    def __init__(
        self,
        input_dim: int,
        bias: bool = True,
        role: Role | None = None,
        reconstruction_weight: float = 1.0,
        approximate: bool = True,
        init: Literal["identity", "orthogonal"] | Tensor = "identity",
        anchor_every: int = 100,
        cache_size: int = 1,
        *,
        exact: Literal["forward", "inverse"] | None = None,
    ):
        role = resolve_role(role, "density", exact=exact)
        super().__init__(input_dim, bias=bias, cache_size=cache_size, role=role)
        if not float(reconstruction_weight) >= 0.0:
            raise ValueError(f"reconstruction_weight must be >= 0, got {reconstruction_weight!r}")
        self.reconstruction_weight = float(reconstruction_weight)
        self.approximate = bool(approximate)
        self.anchor_every = check_positive_int("anchor_every", anchor_every)
        weight = _initial_weight(input_dim, init)
        dtype = torch.get_default_dtype()
        # R is stored transposed: every gradient and the log-det tracking then
        # pair W with R^T element by element, without a transposed copy (which
        # costs more than a GEMM at D = 2048). Both contiguous: Pyro's param
        # store copies a non-contiguous parameter, which would then never train.
        self.W = torch.nn.Parameter(weight.to(dtype).contiguous())
        self.RT = torch.nn.Parameter(torch.linalg.inv(weight).T.to(dtype).contiguous())
        self.register_buffer("tracked_log_det", torch.zeros((), dtype=dtype))
        self.register_buffer("tracked_W", torch.empty(input_dim, input_dim, dtype=dtype))
        self.register_buffer("tracked_RT", torch.empty(input_dim, input_dim, dtype=dtype))
        self._tracker = _Tracker()
        self._anchor()

    @property
    def R(self) -> Tensor:
        """The learned approximate inverse :math:`R`: a view of the parameter ``RT`` = R^T."""
        return self.RT.T

    # ------------------------------------------------------------ the two sides
    def _exact_side(self, u: Tensor) -> Tensor:
        """Rows of ``W u``; in a training forward, with the surrogate gradients."""
        if not (self.training and torch.is_grad_enabled()):
            return u @ self.W.T
        lam = self.reconstruction_weight or None
        probes, scale = _probes(u.shape[0], self.W)
        spent = [False]
        z, term = _SelfNormalizingProduct.apply(u, self.W, self.RT, lam, probes, scale, spent)
        if lam is not None:
            self._tracker.record = _Record(term, self._param_key(), spent)
        return z

    def _fast_side(self, v: Tensor) -> Tensor:
        """Rows of ``R v`` in training mode with ``approximate``, else of ``W^-1 v`` exactly."""
        if self.approximate and self.training:
            return v @ self.RT
        if torch.is_grad_enabled():
            return torch.linalg.solve(self.W.T, v, left=False)  # x W^T = v
        lu, pivots = self._memo("lu", lambda: torch.linalg.lu_factor(self.W))
        return torch.linalg.lu_solve(lu, pivots, v, left=False, adjoint=True)

    exact = LegacyDirection()  # deprecated: read .role

    # In a flow's training run at small D the exact side, its bias, its log-det and
    # its term are one kernel of the flow's single autograd node rather than three to
    # four nodes of their own (what a small-D step costs). Only there: a lone layer's
    # _call must not take a second tracking step, which making a kernel does.
    # Gradients, with or without create_graph, are the layer's own; second-order
    # ones through the surrogate differ by the built-in term's gradient, which each
    # node a backward pass reaches applies once: a second-order pass reaches both
    # the run's node and the re-run (_KernelRun's reference) that made the graph.
    def _kernel(self, inverse: bool) -> tuple[Kernel, tuple] | None:
        if (
            inverse != (self.role == "density")  # the fast side
            or not (self.training and torch.is_grad_enabled())
            or self.input_dim >= KERNEL_MAX_DIM
            or not (self.W.requires_grad and self.RT.requires_grad)  # frozen: the plain path
        ):
            return None
        # The tracking step _log_abs_det would take; a copy, as the buffer moves on.
        kernel = _ExactSideKernel(self, inverse, self._tracked_log_det().clone())
        return kernel, (self.W, self.RT, self.bias)

    # Rows of A x and A^-1 y for the forward-direction matrix A = weight().
    def _matvec(self, x: Tensor) -> Tensor:
        return self._exact_side(x) if self.role == "guide" else self._fast_side(x)

    def _solve(self, y: Tensor) -> Tensor:
        return self._fast_side(y) if self.role == "guide" else self._exact_side(y)

    def _inverse_affine_rows(self, y: Tensor) -> Tensor:
        # A^-1 (y - b) with the bias removed first, so the exact side's input
        # is W's own input.
        return self._solve(y if self.bias is None else y - self.bias)

    # ------------------------------------------------------------ determinants
    def _log_abs_det(self) -> Tensor:
        # log|det W| (exact in eval mode, tracked with the surrogate gradient
        # in training mode), negated for role="density" where weight() = W^-1.
        sign = 1.0 if self.role == "guide" else -1.0
        if not self.training:
            if torch.is_grad_enabled():
                return sign * torch.linalg.slogdet(self.W)[1]
            return self._memo("log_abs_det", lambda: sign * torch.linalg.slogdet(self.W)[1])
        value = self._tracked_log_det()
        if torch.is_grad_enabled():
            value = _SurrogateLogDet.apply(value, self.W, self.RT)
        else:
            value = value.clone()
        return sign * value

    def _dense(self) -> Tensor:
        return self.W.clone() if self.role == "guide" else torch.linalg.inv(self.W)

    # ----------------------------------------------------------------- tracking
    def _param_key(self) -> tuple:
        return parameter_fingerprint((self.W, self.RT))

    # The tracking buffers change inside log_abs_det() but never change the
    # map, so they stay out of the cache key: a cached rsample -> log_prob
    # pair survives them.
    _unkeyed_buffers = ("tracked_log_det", "tracked_W", "tracked_RT")

    def _cache_extras(self) -> tuple:
        return (self.approximate,)  # it changes the fast side

    @torch.no_grad()
    def _anchor(self) -> None:
        """Sets the tracked log-determinant to the exact one at the current W and R."""
        self.tracked_log_det.copy_(torch.linalg.slogdet(self.W)[1])
        self.tracked_W.copy_(self.W)
        self.tracked_RT.copy_(self.RT)
        self._tracker.steps = 0

    def _tracked_log_det(self) -> Tensor:
        # Computed on every call rather than when parameter versions change:
        # optimizers that write through ``.data`` (Pyro's ClippedAdam) leave
        # the versions alone. With no change the step is exactly zero.
        tracker = self._tracker
        tracker.steps += 1
        if tracker.steps >= self.anchor_every:
            self._anchor()
            return self.tracked_log_det
        # log|det W| - log|det W_prev| = int_0^1 tr(W_t^-1 dW) dt, by the
        # trapezoid rule with R and R_prev standing in for the inverses;
        # tr(R dW) is the sum of R^T * dW, element by element. (Each module
        # attribute read once, and a context rather than a decorator: at small D
        # those reads cost as much as the ops, and this runs on every step.)
        W, RT, buffers = self.W, self.RT, self._buffers
        value, last_W = buffers["tracked_log_det"], buffers["tracked_W"]
        last_RT = buffers["tracked_RT"]
        with torch.no_grad():
            value.add_(((RT + last_RT) * (W - last_W)).sum(), alpha=0.5)
            last_W.copy_(W)
            last_RT.copy_(RT)
        return value

    # -------------------------------------------------------------- public API
    def penalty(self) -> Tensor:
        r"""The reconstruction term :math:`\lambda \|R W - I\|_F^2`, for reporting or re-weighting.

        The layer already applies this term's gradient in its own backward
        pass, so no loss needs it. Right after a training forward it is that
        forward's estimate (free: the forward computed it), and a loss that
        adds ``c * penalty()`` trains with weight :math:`c \lambda` instead of
        :math:`\lambda` (the layer then skips its own); otherwise (before any
        training forward, after an optimizer step, or once a backward pass
        went through it) it is computed exactly, O(D^3). Differentiable in
        :math:`W` and :math:`R` when grad is enabled; zero when
        ``reconstruction_weight`` is 0. :func:`pyro_lunet.penalty` sums it
        over a module tree.
        """
        if self.reconstruction_weight == 0:
            return self.W.new_zeros(())
        record = self._tracker.record
        if record is None or record.spent[0] or record.key != self._param_key():
            term = self._reconstruction_term()
        else:
            term = record.term
        return term if torch.is_grad_enabled() else term.detach()

    def _reconstruction_term(self) -> Tensor:
        _, error = _reconstruction_error(None, self.W, self.RT)
        return self.reconstruction_weight * _squared_norm(error)

    @torch.no_grad()
    def sync_inverse(self) -> None:
        r"""Sets :math:`R = W^{-1}` (computed in float64) and re-anchors the log-determinant.

        O(D^3). Useful after changing :math:`W` by hand; an optimizer's
        moment estimates for :math:`R` are left as they are.
        """
        inverse = torch.linalg.inv(self.W.to(torch.float64))
        self.RT.copy_(inverse.T.to(self.RT.dtype))
        self._anchor()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, role={self.role!r}, approximate={self.approximate}, "
            f"reconstruction_weight={self.reconstruction_weight}"
        )


def _initial_weight(dim: int, init) -> Tensor:
    """The initial W in float64."""
    if isinstance(init, Tensor):
        return check_square_matrix("init matrix", init, dim)
    if init == "identity":
        noise = torch.randn(dim, dim, dtype=torch.float64) * (0.01 / dim**0.5)
        return torch.eye(dim, dtype=torch.float64) + noise
    if init == "orthogonal":
        return haar_orthogonal(dim)
    raise ValueError(f"init must be 'identity', 'orthogonal' or a tensor, got {init!r}")


def self_normalizing_linear(input_dim: int, **kwargs) -> SelfNormalizingLinear:
    """A :class:`SelfNormalizingLinear` of dimension ``input_dim``; keywords as for the class.

    ``role="density"`` (default) applies :math:`W` exactly on scoring,
    ``role="guide"`` on sampling.
    """
    return SelfNormalizingLinear(input_dim, **kwargs)


register_family("self_normalizing", self_normalizing_linear, directional=True, maintenance=False)
