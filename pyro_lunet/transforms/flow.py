r"""A chain of transforms run as one module: the output and its log-determinant in one pass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from pyro.distributions.transforms import AffineCoupling, AffineTransform, LowerCholeskyAffine
from torch import Tensor
from torch.distributions import Transform, constraints

from ._fused import (
    affine_coupling_kernel,
    affine_transform_kernel,
    assemble_dense_sides,
    lower_cholesky_affine_kernel,
    run_assembled,
)
from .base import VersionedCacheModule, check_positive_int

__all__ = ["Flow"]

# Pyro's transforms a flow runs as kernels too (exact types: a subclass may change the math).
_FOREIGN_KERNELS = {
    AffineCoupling: affine_coupling_kernel,
    AffineTransform: affine_transform_kernel,
    LowerCholeskyAffine: lower_cholesky_affine_kernel,
}


class Flow(VersionedCacheModule):
    r"""Transforms :math:`f = f_K \circ \cdots \circ f_1` applied as one :class:`TransformModule`.

    .. math::

        \log|\det J_f(x)| = \sum_k \log|\det J_{f_k}(h_{k-1})|,
        \qquad h_0 = x,\; h_k = f_k(h_{k-1}),

    computed alongside the output, in either direction, and kept with it in
    one cache. A chain of Pyro transforms (``ComposeTransformModule``) runs
    every part's own cache lookup, and ``TransformedDistribution.log_prob``
    then walks the parts again for their log-determinants; at small D that
    Python overhead is most of a step. Here ``rsample`` computes :math:`y`
    and :math:`\log|\det J|` in one pass and ``log_prob`` of that sample
    reuses both. The parts' constant log-determinants (every linear layer's)
    are added once, and element-wise ones (activations) summed once.

    The cache is :class:`~pyro_lunet.VersionedCacheModule`'s, keyed on every
    parameter and buffer of every part: it never goes stale. Parts that need
    work before use (the rank-one family's merges) get it before each call.

    The parts stay inspectable and trainable as before: ``flow.parts``,
    ``flow[k]``, ``len(flow)``, ``iter(flow)``; their parameters are named
    ``"0.bias"``, ``"1.packed"``, ... as in a ``ComposeTransformModule``, so
    checkpoints of either load into the other.

    Any :class:`~torch.distributions.Transform` may be a part; this
    library's layers and activations run without their own checks and caches,
    other transforms (Pyro's couplings, ``AffineTransform``) through their
    ``_call`` / ``_inverse`` and ``log_abs_det_jacobian``.

    Cost: the parts' costs, plus one input check and one cache key per call
    (O(number of parameter tensors)) instead of one per part.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import Flow, leaky_softplus, lu_linear
        >>> flow = Flow([lu_linear(3), leaky_softplus(), lu_linear(3)])
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), flow)
        >>> z = d.rsample((5,))
        >>> d.log_prob(z).shape  # y and log|det J| were computed together by rsample
        torch.Size([5])

    :param parts: the transforms :math:`f_1, \dots, f_K`, applied in that order
        (at most ``event_dim`` event dims each).
    :param int event_dim: the flow's event dims (1: vectors).
    :param int input_dim: the size of the last dim, checked on every input
        (default: that of the first part that has an ``input_dim``).
    :param int cache_size: 0 or 1, as for Pyro's transforms.
    """

    bijective = True

    def __init__(
        self,
        parts: Iterable[Transform],
        event_dim: int = 1,
        input_dim: int | None = None,
        cache_size: int = 1,
    ):
        super().__init__(cache_size=cache_size)
        parts = list(parts)
        check_positive_int("event_dim", event_dim)
        for k, part in enumerate(parts):
            if not isinstance(part, Transform):
                raise ValueError(f"Flow parts must be Transforms, got {type(part).__name__} at {k}")
            if part.domain.event_dim > event_dim or part.codomain.event_dim > event_dim:
                raise ValueError(
                    f"Flow with event_dim={event_dim} takes parts of at most that many "
                    f"event dims, got {type(part).__name__} at {k} with "
                    f"{part.domain.event_dim} -> {part.codomain.event_dim}"
                )
            if isinstance(part, torch.nn.Module):
                self.add_module(str(k), part)
        if input_dim is None:
            input_dim = next((p.input_dim for p in parts if hasattr(p, "input_dim")), None)
        self.input_dim = check_positive_int("input_dim", input_dim, optional=True)
        self._event_dim = event_dim
        self._parts = parts  # plain Transforms have no module slot; keep the order here

    @property
    def domain(self):
        return constraints.independent(constraints.real, self._event_dim)

    @property
    def codomain(self):
        return constraints.independent(constraints.real, self._event_dim)

    def _then(self, last: Transform) -> Flow:
        """This flow followed by ``last``, a transform that is not a module (a guide's
        per-call location-scale map), sharing this flow's parts and its cached tensor
        layout but with a cache of its own.

        Why not ``Flow([*flow.parts, last])``: a module built per SVI step costs
        more than a small flow's step and, by registering its parts, invalidates
        every module's cached layout (``_tensor_layout``) at every step.
        """
        if isinstance(last, torch.nn.Module) or last.domain.event_dim > self._event_dim:
            raise ValueError(
                f"Flow._then takes a plain transform of at most {self._event_dim} event dims, "
                f"got {type(last).__name__}"
            )
        new = object.__new__(type(self))  # no Module.__init__: this runs every SVI step
        new.__dict__.update(self.__dict__)
        new.__dict__.update(
            _parts=[*self._parts, last], _modules=dict(self._modules), _inv=None, _cache_token=None
        )
        new._cached_x_y = None, None
        new.clear_cache()
        return new

    # ------------------------------------------------------------ inspection
    @property
    def parts(self) -> list[Transform]:
        """The transforms :math:`f_1, \\dots, f_K`, in the order they are applied."""
        return list(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def __iter__(self) -> Iterator[Transform]:
        return iter(self._parts)

    def __getitem__(self, index: int) -> Transform:
        return self._parts[index]

    # ----------------------------------------------------------- the protocol
    def _before_use(self) -> None:
        for part in self._parts:
            if isinstance(part, VersionedCacheModule):
                part._before_use()

    def _cache_extras(self) -> tuple:
        return tuple(
            extra
            for part in self._parts
            if isinstance(part, VersionedCacheModule)
            for extra in part._cache_extras()
        )

    def _call(self, x: Tensor) -> Tensor:
        return self._run(x, inverse=False)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self._run(y, inverse=True)[0]

    def _call_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(x, inverse=False)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._run(y, inverse=True)

    def _apply_with_log_det(self, h: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        return self._run(h, inverse)  # a flow inside a flow

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`\\log|\\det J_f(x)|` over the batch; free right after a call on ``x``."""
        log_det = self._cached_log_det(x, y)
        if log_det is None:
            self._before_use()
            log_det = self._run(x, inverse=False)[1]
        return log_det

    def _run(self, h: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The image of ``h`` through every part (in reverse for ``inverse``) and the log-det."""
        self._check_input(h)
        batch_shape = h.shape[: h.dim() - self._event_dim]
        if h.numel() == 0:  # some kernels (MKL's FFT, reductions over parts) refuse empty batches
            return h.clone(), h.new_zeros(batch_shape)
        constant: list[Tensor] = []  # 0-dim log-dets, e.g. every linear layer's
        elementwise = None  # shaped like h: summed over the event once, at the end
        total = None  # batch-shaped
        kernels: list = []  # consecutive steps with kernels, run as one autograd node

        def add(log_det: Tensor | None) -> None:
            nonlocal elementwise, total
            if log_det is None:  # a run of steps whose log-dets were all assembled
                return
            if log_det.dim() == 0:
                constant.append(log_det)
            elif log_det.dim() == h.dim():
                elementwise = log_det if elementwise is None else elementwise + log_det
            else:
                log_det = _sum_event(log_det, h.dim() - self._event_dim)
                total = log_det if total is None else total + log_det

        order = self._parts[::-1] if inverse else self._parts
        # The flow's dense-kernel layers get their matrices in one batched
        # assembly per kind (see DenseSide), before any step runs.
        steps, assembled = assemble_dense_sides([_kernel_of(part, inverse) for part in order])
        if assembled is not None:
            constant.append(assembled)
        for part, kernel in zip(order, steps):
            if kernel is not None:
                kernels.append(kernel)
                continue
            if kernels:
                h, log_det = _run_kernels(kernels, h)
                add(log_det)
                kernels = []
            step = getattr(part, "_apply_with_log_det", None)
            h, log_det = step(h, inverse) if step else _apply_foreign(part, h, inverse)
            add(log_det)
        if kernels:
            h, log_det = _run_kernels(kernels, h)
            add(log_det)
        if elementwise is not None:
            part_sum = _sum_event(elementwise, h.dim() - self._event_dim)
            total = part_sum if total is None else total + part_sum
        if constant:
            const = constant[0] if len(constant) == 1 else torch.stack(constant).sum()
            total = const if total is None else total + const
        if total is None:
            return h, h.new_zeros(batch_shape)
        return h, total.expand(batch_shape)

    def _check_input(self, h: Tensor) -> None:
        if not isinstance(h, Tensor):
            raise ValueError(f"Flow expects a Tensor, got {type(h).__name__}")
        if h.dim() < self._event_dim or (
            self.input_dim is not None and h.shape[-1] != self.input_dim
        ):
            want = f"(..., {self.input_dim})" if self.input_dim is not None else "more dims"
            raise ValueError(f"Flow expects inputs of shape {want}, got {tuple(h.shape)}")
        ref = self._first_parameter()
        if ref is not None and (h.dtype != ref.dtype or h.device != ref.device):
            raise ValueError(
                f"Flow expects {ref.dtype} on {ref.device} (its parameters'), "
                f"got {h.dtype} on {h.device}"
            )

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, event_dim={self._event_dim}"


def _sum_event(log_det: Tensor, batch_dims: int) -> Tensor:
    """``log_det`` summed over its dims after the first ``batch_dims``."""
    extra = log_det.dim() - batch_dims
    return log_det.sum(tuple(range(-extra, 0))) if extra > 0 else log_det


def _kernel_of(part: Transform, inverse: bool) -> tuple | None:
    """The part's kernel for this direction (see ``_fused.py``), or ``None``."""
    own = getattr(part, "_kernel", None)
    if own is not None:
        return own(inverse)
    adapter = _FOREIGN_KERNELS.get(type(part))
    return adapter(part, inverse) if adapter is not None else None


def _run_kernels(kernels: list, h: Tensor) -> tuple[Tensor, Tensor | None]:
    """A run of kernel steps (their dense sides assembled) on the rows of ``h``, one node."""
    out, log_det = run_assembled(kernels, h.reshape(-1, h.shape[-1]))
    if log_det is None:
        return out.reshape(h.shape), None
    return out.reshape(h.shape), log_det if log_det.dim() == 0 else log_det.reshape(h.shape[:-1])


def _apply_foreign(part: Transform, h: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """A step through a transform that is not this library's, bypassing its identity cache.

    Pyro's transforms answer a repeated input from a cache keyed by identity
    alone, stale after a parameter update; a flow calls ``_call`` /
    ``_inverse`` instead. Their ``log_abs_det_jacobian`` reuses what that
    call computed (a coupling's log-scale) when told that ``(x, y)`` is the
    pair just computed, so the pair is set for that one query. Afterwards
    the part keeps no tensor of this call: a graph held there would leak
    a batch and make the flow impossible to deep-copy or pickle.
    """
    out = part._inverse(h) if inverse else part._call(h)
    x, y = (out, h) if inverse else (h, out)
    if getattr(part, "_cache_size", 0) == 1:
        part._cached_x_y = x, y
    try:
        log_det = part.log_abs_det_jacobian(x, y)
    finally:
        _forget_intermediates(part)
    return out, log_det


def _forget_intermediates(part: Transform) -> None:
    """Drops the cached pairs and graph-carrying tensors a Pyro transform keeps after a call."""
    modules = part.modules() if isinstance(part, torch.nn.Module) else (part,)
    for module in modules:
        state = vars(module)
        if isinstance(state.get("_cached_x_y"), tuple):
            state["_cached_x_y"] = None, None
        for name, value in list(state.items()):
            if isinstance(value, Tensor) and value.grad_fn is not None:
                state[name] = None
