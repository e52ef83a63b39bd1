r"""Rank-one-updated invertible linear layers (P4Inv)."""

from __future__ import annotations

import math
import weakref
from typing import Literal

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from ._fused import KERNEL_MAX_DIM, RankOneKernel
from .base import (
    InvertibleLinear,
    Role,
    check_positive_int,
    check_square_matrix,
    haar_orthogonal,
)
from .registry import register_family

__all__ = ["RankOneUpdatedLinear", "rank_one_updated_linear"]

# The reference code's margins around ``log_det_range`` for accepting a merge.
_DEN_MARGIN = 4.0
_LOG_DET_MARGIN = 0.5


class _Upkeep:
    """A layer's own maintenance state, shared with its ``with_cache`` views.

    ``pending`` counts the optimizer steps that updated ``v`` since the layer
    last caught up, ``optimizers`` the optimizers that stepped ``u`` or ``v``
    (whose state a merge resets). ``steps``, ``rounds`` and ``draws`` (the
    fresh ``v`` drawn so far, which with ``seed`` decide the next one) are
    saved in ``state_dict``, so a restored layer, and every data-parallel
    replica, merges and draws exactly as the original.
    """

    def __init__(self, seed: int):
        self.seed, self.steps, self.rounds, self.draws, self.pending = seed, 0, 0, 0, 0
        self.optimizers: weakref.WeakSet = weakref.WeakSet()
        self.scheduler: weakref.ref | None = None  # an explicit Maintenance in charge

    def counters(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("seed", "steps", "rounds", "draws")}

    def __getstate__(self) -> dict:
        return self.counters()

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["seed"])
        self.__dict__.update(state)


# Every live layer's u and v, mapped to (its upkeep, whether it is v): the
# optimizer step hook below learns from this which layers a step touched.
_upkeep_by_parameter = WeakIdKeyDictionary()


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _upkeep_by_parameter:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = _upkeep_by_parameter.get(param)
            upkeep = None if entry is None else entry[0]()
            if upkeep is not None:
                upkeep.optimizers.add(optimizer)
                upkeep.pending += entry[1]  # counted once a step, on v


register_optimizer_step_post_hook(_after_optimizer_step)


class RankOneUpdatedLinear(InvertibleLinear):
    r"""An invertible linear layer trained through rank-one perturbations (P4Inv),

    .. math::

        y = (A + u v^\top) x + b,

    where :math:`A`, :math:`A^{-1}` and :math:`\log|\det A|` are buffers that
    no optimizer touches, and :math:`u` (initially 0), :math:`v` (initially
    :math:`\mathcal{N}(0, I)`) and :math:`b` are the trained parameters. With
    :math:`w = A^{-1} u` and :math:`\delta = 1 + v^\top w`, the matrix
    determinant lemma and the Sherman-Morrison formula give

    .. math::

        \log|\det W| = \log|\det A| + \log|\delta|, \qquad
        W^{-1} y = A^{-1} y - \frac{w\, v^\top A^{-1} y}{\delta}.

    Every so often :meth:`merge_` folds :math:`u v^\top` into the buffers by
    the same two formulas (O(D^2)) and restarts the perturbation from
    :math:`u = 0` and a fresh :math:`v`, so the layer walks through the
    invertible matrices one rank-one step at a time without ever factorizing
    one. :meth:`penalty` (summed by :func:`pyro_lunet.penalty`) keeps
    :math:`\delta` away from 0.

    **The layer maintains itself**, in any loop and any Pyro ELBO: it counts
    the optimizer steps that update its :math:`v` (torch's optimizer step
    hooks, Pyro's optimizers included) and, at its next training-mode use,
    before any graph captures :math:`u` or :math:`v`, runs the round they
    make due: every ``merge_every`` steps a merge (forced every
    ``force_every`` rounds) followed by dropping the stepping optimizers'
    state for the redrawn :math:`v`, and every ``correct_every`` rounds a
    drift correction with an exact :math:`\log|\det A|`. Each fresh
    :math:`v` is drawn from a seed the layer keeps (taken from torch's
    global generator at construction) and a counter in ``state_dict``, so
    seeded runs and data-parallel replicas stay identical. An explicit
    :class:`~pyro_lunet.Maintenance` (or :class:`~pyro_lunet.RankOneScheduler`;
    also used by :class:`~pyro_lunet.PenalizedELBO` and
    :func:`~pyro_lunet.fit_density`) takes over from the layer's own
    schedule while it lives; ``merge_every=None`` turns it off.

    Costs for a batch of N: each direction is one dense GEMM with a buffer
    (:math:`2 N D^2` flops) plus O(N D + D^2) for the rank-one terms, and its
    backward needs no weight gradient at all: :math:`u` and :math:`v` get
    theirs in O(N D + D^2), and no D x D tensor is formed. The log-determinant
    costs one matrix-vector product, O(D^2); a merge O(D^2); a correction
    O(D^3) (six matrix products and an LU inverse).

    Unlike most layers here the layer is not invertible by construction for
    every parameter value: :math:`W` is singular where :math:`\delta = 0`.
    That set has measure zero; :meth:`penalty` keeps training away from it
    (the paper's remedy), and :meth:`merge_` never folds an update whose
    :math:`\delta` is too close to it, so :math:`A` itself stays invertible.

    The buffers are state like the parameters: ``state_dict()`` holds them and
    ``.to()`` moves them (Pyro's param store does not: save a guide with its
    ``state_dict``). Casting to a finer dtype (``.double()``) refreshes
    :math:`A^{-1}` and :math:`\log|\det A|` to the new precision by
    :meth:`correct_`; after loading a coarser checkpoint into a finer layer,
    call ``correct_(recompute_log_det=True)`` yourself.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import penalty, rank_one_updated_linear
        >>> layer = rank_one_updated_linear(3)
        >>> flow = dist.TransformedDistribution(
        ...     dist.Normal(torch.zeros(3), 1.0).to_event(1), [layer])
        >>> opt = torch.optim.Adam(layer.parameters(), lr=0.1)
        >>> data = torch.randn(100, 3) * torch.tensor([1.0, 2.0, 3.0])
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = -flow.log_prob(data).mean() + penalty(layer)
        ...     loss.backward()
        ...     opt.step()
        >>> before = layer.weight().detach()
        >>> bool(layer.merge_())                  # fold u v^T into A
        True
        >>> torch.allclose(layer.weight(), before)  # the map is unchanged
        True
        >>> layer.u.abs().max().item()
        0.0

    Reference: Krämer, Noé, Köhler, "Training Invertible Linear Layers
    through Rank-One Perturbations", arXiv:2010.07033 (2020), and its code
    (``InvertiblePPPP``). Differences: the map is always the exact
    :math:`A + u v^\top` (the reference drops the perturbation in eval mode
    and merges on ``train()``/``eval()``; here mode changes have no side
    effects); merges decide with tensor operations, so they never wait for
    the device; a forced merge still refuses a denominator it cannot
    represent; and :meth:`correct_` uses an 8th-order hyper-power step in
    six products where the reference uses a 7th-order one in nine.

    :param int input_dim: the dimension D.
    :param bool bias: whether to learn a bias.
    :param init: the initial :math:`A`: ``"identity"`` (default),
        ``"reverse"`` (the reference code's reversal permutation),
        ``"orthogonal"`` (Haar-random orthogonal), or an invertible ``(D, D)``
        tensor (inverted and its log-determinant taken in float64, then
        stored in the default dtype).
    :param log_det_range: ``(low, high)``: where :math:`\log|\delta|` and
        the merged :math:`\log|\det A|` should stay. :meth:`penalty` is
        quadratic outside it, and unforced merges are skipped when
        :math:`\log|\delta| < low - 4` or the merged log-determinant would
        leave ``[low - 0.5, high + 0.5]`` (the reference's margins).
        Default ``(-2, 15)``.
    :param float penalty_weight: the weight of :meth:`penalty` (0.1).
    :param merge_every: optimizer steps between the layer's own merge
        rounds, or ``None`` to leave merges to the user.
    :param int cache_size: 0 or 1, as for Pyro's transforms.
    :param str role: ``"guide"`` (default) or ``"density"``, accepted by every
        family alike and validated; here it changes nothing: both directions
        cost the same order, O(D^2) (a product, a Sherman-Morrison solve).
    """

    #: Merge rounds between forced merges, and between drift corrections
    #: (each with an exact recomputation of log|det A|), when self-maintained.
    force_every = 10
    correct_every = 50

    def __init__(
        self,
        input_dim: int,
        bias: bool = True,
        init: Literal["identity", "reverse", "orthogonal"] | Tensor = "identity",
        log_det_range: tuple[float, float] = (-2.0, 15.0),
        penalty_weight: float = 0.1,
        merge_every: int | None = 10,
        cache_size: int = 1,
        role: Role = "guide",
    ):
        super().__init__(input_dim, bias=bias, cache_size=cache_size, role=role)
        low, high = _check_range(log_det_range)
        if not (isinstance(penalty_weight, (int, float)) and penalty_weight >= 0):
            raise ValueError(f"penalty_weight must be a float >= 0, got {penalty_weight!r}")
        self.log_det_range = (low, high)
        self.penalty_weight = float(penalty_weight)
        self.u = torch.nn.Parameter(torch.zeros(input_dim))
        self.v = torch.nn.Parameter(torch.randn(input_dim))
        a, a_inv, log_abs_det, sign = _initial_base(input_dim, init)
        self.register_buffer("A", a)
        self.register_buffer("A_inv", a_inv)
        self.register_buffer("log_abs_det_A", log_abs_det)
        self.register_buffer("sign_det_A", sign)
        self.merge_every = check_positive_int("merge_every", merge_every, optional=True)
        # From the global generator: seeded runs, and replicas, agree.
        self._upkeep = _Upkeep(int(torch.randint(2**62, ())))

    # ------------------------------------------------------- self-maintenance
    def _before_use(self) -> None:
        upkeep = self._upkeep
        if not self.training:
            return
        for param, is_v in ((self.u, 1), (self.v, 0)):  # (re-)register if replaced
            entry = _upkeep_by_parameter.get(param)
            if entry is None or entry[0]() is not upkeep:
                _upkeep_by_parameter[param] = (weakref.ref(upkeep), 1 - is_v)
        if not upkeep.pending:
            return
        in_charge = upkeep.scheduler is not None and upkeep.scheduler() is not None
        if self.merge_every is None or in_charge:
            upkeep.pending = 0
            return
        self._catch_up()

    def _catch_up(self) -> None:
        """Counts the pending optimizer steps and runs the merge round they make due, if any."""
        upkeep, every = self._upkeep, self.merge_every
        before = upkeep.steps
        upkeep.steps += upkeep.pending
        upkeep.pending = 0
        rounds = upkeep.steps // every - before // every
        if not rounds:
            return
        first, upkeep.rounds = upkeep.rounds + 1, upkeep.rounds + rounds

        def due(cadence: int) -> bool:  # a multiple of cadence among the rounds just done
            return upkeep.rounds // cadence > (first - 1) // cadence

        correct = due(self.correct_every)
        stale = self.maintenance_round(due(self.force_every), int(correct), correct)
        discarded = stale[1][1]  # u's flag: a non-finite update was thrown away
        for optimizer in upkeep.optimizers:
            # v was redrawn (or kept, when the merge was refused: a restart of
            # its moments costs little), and its moments belong to the old v;
            # a discarded non-finite u takes its moments with it. Decided on
            # the device: no synchronization.
            optimizer.state.pop(self.v, None)
            for value in optimizer.state.get(self.u, {}).values():
                if isinstance(value, Tensor) and value.shape == self.u.shape:
                    value.copy_(torch.where(discarded, 0, value))

    # ------------------------------------------- an explicit scheduler's hooks
    def maintenance_round(
        self, force: bool, correct_steps: int, recompute_log_det: bool
    ) -> list[tuple[Tensor, Tensor]]:
        """One round of :class:`~pyro_lunet.Maintenance`: a merge, then a correction if asked.

        Returns the parameters whose optimizer state the merge made stale, as
        device flags: ``v`` when it was redrawn, ``u`` too when a non-finite
        update was discarded.
        """
        merged, reset = self._merge(force)
        if correct_steps or recompute_log_det:
            self.correct_(correct_steps, recompute_log_det=recompute_log_det)
        return [(self.v, reset), (self.u, reset & ~merged)]

    def maintenance_claim(self, scheduler: object) -> None:
        """Leaves the layer's own rounds to ``scheduler`` while that object lives."""
        self._upkeep.scheduler = weakref.ref(scheduler)

    # The counters travel in state_dict as one int64 CPU tensor, which every
    # consumer of a state_dict (torch.load(weights_only=True) included) takes.
    def get_extra_state(self) -> Tensor:
        return torch.tensor(list(self._upkeep.counters().values()), dtype=torch.int64)

    def set_extra_state(self, state: Tensor) -> None:
        names = self._upkeep.counters()
        self._upkeep.__dict__.update(zip(names, (int(n) for n in state.tolist())))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        missing_keys = args[3] if len(args) > 3 else kwargs["missing_keys"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Checkpoints from before self-maintenance have no counters: keep ours.
        if prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")

    def _fresh_v(self) -> Tensor:
        """The next v, drawn from the layer's own seed: the same in every process."""
        upkeep, v = self._upkeep, self.v
        generator = torch.Generator(device=v.device).manual_seed(upkeep.seed + upkeep.draws)
        upkeep.draws += 1
        return torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device)

    # ------------------------------------------------------------ the update
    def _update_terms(self) -> tuple[Tensor, Tensor]:
        r"""``(w, delta)``: :math:`A^{-1} u` and :math:`1 + v^\top A^{-1} u`."""

        def compute():
            w = self.A_inv @ self.u
            return w, 1 + self.v @ w

        return self._memo("update_terms", compute)

    def _kernel(self, inverse: bool) -> tuple[RankOneKernel, tuple] | None:
        # The product side with its bias and log|det| as one kernel inside a
        # flow (see _fused.py); separate ops without a graph (memoized terms).
        if inverse or self.input_dim >= KERNEL_MAX_DIM or not torch.is_grad_enabled():
            return None
        params = (self.A, self.A_inv, self.log_abs_det_A, self.u, self.v, self.bias)
        return RankOneKernel(), params

    def _matvec(self, x: Tensor) -> Tensor:
        # x A^T + (x v) u^T: the GEMM's operands are a buffer and the input,
        # so its backward never forms a D x D weight gradient.
        return torch.addr(x @ self.A.T, x @ self.v, self.u)

    def _solve(self, y: Tensor) -> Tensor:
        w, delta = self._update_terms()
        z = y @ self.A_inv.T
        return torch.addr(z, z @ self.v, w / delta, alpha=-1)

    def _log_abs_det(self) -> Tensor:
        _, delta = self._update_terms()
        return self.log_abs_det_A + delta.abs().log()

    def _dense(self) -> Tensor:
        return self.A + torch.outer(self.u, self.v)

    # --------------------------------------------------------- training aids
    def penalty(self) -> Tensor:
        r"""The reference code's soft range penalty, a differentiable 0-dim tensor:

        .. math::

            \lambda \big[\rho(\log|\delta|) + \rho(\log|\det A| + \log|\delta|)\big],
            \quad \rho(t) = \max(0, low - t)^2 + \max(0, t - high)^2,

        with :math:`\lambda` = ``penalty_weight`` and ``(low, high)`` =
        ``log_det_range``. It is zero while :math:`\delta` and the merged
        log-determinant stay in range and keeps :math:`\delta` away from the
        singular set :math:`\delta = 0`. O(D^2). Add it to the loss, for a
        whole model at once with :func:`pyro_lunet.penalty`.
        """
        self._before_use()
        low, high = self.log_det_range
        _, delta = self._update_terms()
        log_delta = delta.abs().log()
        terms = torch.stack([log_delta, self.log_abs_det_A + log_delta])
        outside = (low - terms).clamp_min(0).square() + (terms - high).clamp_min(0).square()
        return self.penalty_weight * outside.sum()

    def merge_(self, force: bool = False) -> Tensor:
        r"""Folds :math:`u v^\top` into :math:`A`; the map stays the same. O(D^2).

        With :math:`w = A^{-1} u` and :math:`\delta = 1 + v^\top w`:
        :math:`A \leftarrow A + u v^\top`,
        :math:`A^{-1} \leftarrow A^{-1} - w (v^\top A^{-1}) / \delta`,
        :math:`\log|\det A| \mathrel{+}= \log|\delta|` (and the sign of
        :math:`\det A` times that of :math:`\delta`); then :math:`u = 0` and
        :math:`v` is redrawn from :math:`\mathcal{N}(0, I)` (from the layer's
        own seed and draw count, so the draw is the same in every process).

        A merge is skipped, leaving everything as it was, when
        :math:`\log|\delta|` or the merged log-determinant would leave the
        range set by ``log_det_range``, unless ``force``; even a forced merge
        is skipped when :math:`|\delta| \le \sqrt{\epsilon}\,(1 + \|v\|\|w\|)`,
        below which :math:`\delta` (and so the new :math:`A^{-1}`) is not
        known to half the working precision. A non-finite :math:`u` or
        :math:`v` is never merged: both are reset instead. Each outcome
        leaves :math:`A`, :math:`A^{-1}` and the log-determinant consistent.

        The decision is taken with tensor operations on the layer's device,
        so a merge never waits for it; the result is a tensor, and only
        reading it (``bool(...)``) synchronizes.

        :param bool force: merge even out of range.
        :returns: a 0-dim bool tensor, whether the update was merged.
        """
        return self._merge(force)[0]

    @torch.no_grad()
    def _merge(self, force: bool = False) -> tuple[Tensor, Tensor]:
        """``merge_``'s work; returns ``(merged, reset)``: whether u, v were merged, redrawn."""
        u, v, a_inv = self.u, self.v, self.A_inv
        finite = torch.isfinite(u).all() & torch.isfinite(v).all()
        # Zeroed when non-finite, so all arithmetic below stays finite.
        u0, v0 = torch.where(finite, u, 0), torch.where(finite, v, 0)
        w = a_inv @ u0
        v_a_inv = v0 @ a_inv
        delta = 1 + v0 @ w
        log_delta = delta.abs().log()
        merged_log_det = self.log_abs_det_A + log_delta
        low, high = self.log_det_range
        in_range = (
            (log_delta > low - _DEN_MARGIN)
            & (merged_log_det > low - _LOG_DET_MARGIN)
            & (merged_log_det < high + _LOG_DET_MARGIN)
        )
        eps = torch.finfo(delta.dtype).eps
        representable = delta.abs() > math.sqrt(eps) * (1 + v0.norm() * w.norm())
        merged = finite & representable & (in_range | force)
        reset = merged | ~finite
        # Skipped merges add exact zeros: the buffers keep their values.
        self.A.addr_(torch.where(merged, u0, 0), v0)
        a_inv.addr_(torch.where(merged, w / delta, 0), v_a_inv, alpha=-1)
        self.log_abs_det_A.add_(torch.where(merged, log_delta, 0))
        self.sign_det_A.mul_(torch.where(merged, delta.sign(), 1))
        u.copy_(torch.where(reset, 0, u))
        v.copy_(torch.where(reset, self._fresh_v(), v))
        return merged, reset

    @torch.no_grad()
    def correct_(self, steps: int = 1, recompute_log_det: bool = False) -> None:
        r"""Removes the rounding drift that merges leave in :math:`A^{-1}`. O(D^3).

        Each step is the 8th-order hyper-power iteration: with the residual
        :math:`R = I - A X` of the current inverse :math:`X`,

        .. math::

            X \leftarrow X (I + R)(I + R^2)(I + R^4)
              = X \sum_{k=0}^{7} R^k,
            \qquad I - A X \leftarrow R^8,

        since :math:`A X \sum_{k<8} R^k = (I - R) \sum_{k<8} R^k = I - R^8`:
        six D x D products take a residual of 1e-3 to rounding level. It
        converges when :math:`\|R\| < 1`; where the first residual is not
        below 1/2 in Frobenius norm (a far-gone or non-finite inverse), an LU
        inverse of :math:`A` replaces the result instead. That choice is made
        on the device (``torch.where``), so a correction never synchronizes;
        the LU inverse it computes for the purpose costs about as much as
        two of the products.

        :param int steps: the number of iterations (one suffices for drift).
        :param bool recompute_log_det: also recompute :math:`\log|\det A|`
            and its sign exactly (``slogdet``), clearing the log-determinant's
            own drift.
        """
        check_positive_int("steps", steps, minimum=0)
        a, x = self.A, self.A_inv
        eye = torch.eye(self.input_dim, dtype=a.dtype, device=a.device)
        far = None
        for step in range(steps):
            residual = torch.addmm(eye, a, x, alpha=-1)  # R = I - A X
            if step == 0:
                far = ~(torch.linalg.matrix_norm(residual) < 0.5)
            r2 = residual @ residual
            r4 = r2 @ r2
            x = torch.addmm(x, x, residual)  # X (I + R)
            x = torch.addmm(x, x, r2)  # ... (I + R^2)
            x = torch.addmm(x, x, r4)  # ... (I + R^4)
        if far is not None:
            self.A_inv.copy_(torch.where(far, torch.linalg.inv_ex(a).inverse, x))
        if recompute_log_det:
            sign, log_abs_det = torch.linalg.slogdet(a)
            self.log_abs_det_A.copy_(log_abs_det)
            self.sign_det_A.copy_(sign)

    def _apply(self, fn, recurse=True):
        # Casting to a finer dtype keeps A exact but leaves A^-1 and the
        # log-determinant only as accurate as the old dtype: refresh them.
        old = self.A.dtype
        result = super()._apply(fn, recurse)
        new = self.A.dtype
        finer = old.is_floating_point and torch.finfo(new).eps < torch.finfo(old).eps
        if finer and new in (torch.float32, torch.float64):
            self.correct_(recompute_log_det=True)
        return result

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, log_det_range={self.log_det_range}, "
            f"penalty_weight={self.penalty_weight}, merge_every={self.merge_every}"
        )


def _check_range(log_det_range) -> tuple[float, float]:
    try:
        low, high = (float(t) for t in log_det_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"log_det_range must be a pair (low, high), got {log_det_range!r}"
        ) from None
    if not low < high:
        raise ValueError(f"log_det_range must have low < high, got {log_det_range!r}")
    return low, high


def _initial_base(dim: int, init) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(A, A^-1, log|det A|, sign det A)`` in the default dtype."""
    dtype = torch.get_default_dtype()
    if isinstance(init, Tensor):
        a = check_square_matrix("init matrix", init, dim)
        sign, log_abs_det = torch.linalg.slogdet(a)
        a_inv, info = torch.linalg.inv_ex(a)
        if info != 0 or not torch.isfinite(a_inv).all():
            raise ValueError("init matrix must be an invertible matrix, got a singular one")
    elif init == "identity":
        a = a_inv = torch.eye(dim, dtype=torch.float64)
        sign, log_abs_det = torch.tensor(1.0), torch.tensor(0.0)
    elif init == "reverse":
        a = a_inv = torch.eye(dim, dtype=torch.float64).flip(0)
        # The reversal is floor(D / 2) transpositions.
        sign, log_abs_det = torch.tensor(-1.0 if dim // 2 % 2 else 1.0), torch.tensor(0.0)
    elif init == "orthogonal":
        a = haar_orthogonal(dim)
        a_inv = a.T
        sign, log_abs_det = torch.linalg.slogdet(a)[0], torch.tensor(0.0)
    else:
        raise ValueError(
            f"init must be 'identity', 'reverse', 'orthogonal' or a tensor, got {init!r}"
        )
    return tuple(t.to(dtype).clone() for t in (a, a_inv, log_abs_det, sign))


def rank_one_updated_linear(input_dim: int, **kwargs) -> RankOneUpdatedLinear:
    """A :class:`RankOneUpdatedLinear` of dimension ``input_dim``; keywords as for the class."""
    return RankOneUpdatedLinear(input_dim, **kwargs)


register_family("rank_one", rank_one_updated_linear, directional=False, maintenance=True)
