r"""Butterfly layers (ButterflyFlow): O(D log D) invertible mixing for every dimension."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._fused import stack_params
from .base import InvertibleLinear, Role, check_choice, check_positive_int, random_signs
from .registry import register_family

__all__ = ["ButterflyLinear", "butterfly_linear"]

# Up to this size a layer is applied as its dense matrix (see _dense_sides).
# Measured (activation_flow(D, 4), one thread, dense / grouped step time):
# guide 0.35 at D = 32, 0.51 at 64, 1.11 at 128; density 0.36, 0.45, 0.87.
_DENSE_MAX = 64


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class _Plan:
    """How the levels are grouped into dense blocks.

    The ``padded`` slots are indexed by ``bits`` bits. The levels in use act
    on the top bits; the ``inner`` = 2^(bits - levels) combinations of the
    bits below them are never mixed. ``sizes`` are the block sizes
    ``K_1, ..., K_c`` (powers of two, lowest bits first) of the groups of
    consecutive levels: group ``i`` acts on its bits by one dense
    ``K_i x K_i`` matrix for every combination of the other bits.
    """

    padded: int
    inner: int
    sizes: tuple[int, ...]
    bits: tuple[int, ...]  # each group's number of bits, lowest first


def _make_plan(dim: int, levels: int, block_levels: int) -> _Plan:
    bits = (dim - 1).bit_length()
    groups = math.ceil(levels / block_levels) if levels else 0
    # As even as possible, larger groups on the low bits.
    split = [levels // groups + (i < levels % groups) for i in range(groups)] if groups else []
    return _Plan(
        padded=1 << bits,
        inner=1 << (bits - levels),
        sizes=tuple(1 << k for k in split),
        bits=tuple(split),
    )


# ------------------------------------------------------------- the 2x2 math
def _block_entries(angle: Tensor, log_scale: Tensor, shear: Tensor, sign: Tensor, inverse: bool):
    r"""Entries ``(a, b, c, d)`` of each block, stacked on the last dim.

    A block is :math:`R(\theta)\,\mathrm{diag}(\alpha, \beta)\,[[1, \tau], [0, 1]]`
    with :math:`\alpha = s_1 e^{u}`, :math:`\beta = s_2 e^{v}`; its inverse
    :math:`[[1, -\tau], [0, 1]]\,\mathrm{diag}(1/\alpha, 1/\beta)\,R(-\theta)`
    is written out directly (no division by a determinant).
    """
    cos, sin = angle.cos(), angle.sin()
    if inverse:
        inv_alpha, inv_beta = (sign * torch.exp(-log_scale)).unbind(-1)
        c = -sin * inv_beta
        d = cos * inv_beta
        a = cos * inv_alpha - shear * c
        b = sin * inv_alpha - shear * d
    else:
        alpha, beta = (sign * torch.exp(log_scale)).unbind(-1)
        a = cos * alpha
        c = sin * alpha
        b = a * shear - sin * beta
        d = c * shear + cos * beta
    return torch.stack((a, b, c, d), dim=-1)


def _group_matrices(grid: Tensor, plan: _Plan, inverse: bool) -> list[Tensor]:
    r"""The dense blocks of each group, assembled from the 2x2 entries.

    ``grid`` is ``(levels, padded / 2, 4)``, row ``t`` holding the entries of
    the level on bit ``t`` of the used bits (lowest first), every pair of
    that level in the order of its lower coordinate. Returns, per group, a
    ``(padded / K, K, K)`` tensor whose batch runs over the bits below the
    group, then those above it (the order in which :class:`_GroupChain`
    meets them).

    A group of k levels takes k - 1 doublings. The inverse blocks are
    :math:`G_0 G_1 \cdots G_{k-1}` (:math:`G_s` the inverse level on the
    group's bit s): the product of the first s factors is block diagonal
    with blocks of size 2^s, and :math:`G_s` combines two of them into one
    of size 2^(s+1) by one broadcast multiply on columns. The forward blocks
    :math:`F_{k-1} \cdots F_0` are built the same way as their transposes
    :math:`F_0^T \cdots F_{k-1}^T`. The batch is kept innermost, so every
    multiply runs along contiguous memory. Cost O(padded * K) per group.
    """
    mats = []
    low = 0
    rows = grid.unbind(0)
    cover = plan.padded // plan.inner  # slots spanned by the used bits
    for k, size in zip(plan.bits, plan.sizes):
        below = plan.inner << low  # combinations of the bits below the group
        above_group = cover // (size << low)  # ... and above it
        mat = None
        for s in range(k):
            half = 1 << s
            above = k - 1 - s  # the group's bits above s
            # A pair's index: (bits above the group, the group's bits above
            # s, its bits below s, bits below the group); then the entry (r, c).
            entries = rows[low + s].reshape(above_group, *([2] * above), half, below, 2, 2)
            lower, outer, row, col = above + 1, above + 2, above + 3, above + 4
            if not inverse:
                row, col = col, row  # transposed factors
            # coef[r, c, j, m]: the batch m runs over the group's bits above s
            # (lowest first), then the bits below and above the group.
            order = [row, col, lower, *range(above, 0, -1), outer, 0]
            coef = entries.permute(order).reshape(2, 2, half, -1)
            if mat is None:
                mat = coef.reshape(2, 2, -1)
                continue
            prev = mat.view(half, half, 2, -1)  # [i, j, block by bit s, m]
            # new[r, i, c, j, m] = prev_r[i, j, m] * coef[r, c, j, m]
            new = prev.permute(2, 0, 1, 3).unsqueeze(2) * coef.unsqueeze(1)
            mat = new.reshape(2 * half, 2 * half, -1)
        mats.append(mat.permute(2, 0, 1) if inverse else mat.permute(2, 1, 0))
        low += k
    return [m.contiguous() for m in mats]


def _level_products(layout, inverse, angle, log_scale, shear, sign) -> Tensor:
    r"""The product of the level matrices, ``(D, D)``, or ``(K, D, D)`` for stacked layers:
    :math:`W = B_0 B_1 \cdots B_{L-1}`, or :math:`W^{-1} = B_{L-1}^{-1} \cdots B_0^{-1}`.

    The entries of all blocks are scattered into the level stack in one op.
    """
    flat, identity = layout
    entries = _block_entries(angle, log_scale, shear, sign, inverse)
    if angle.dim() == 1:
        levels = torch.index_put(identity.to(entries.dtype).view(-1), (flat,), entries.view(-1))
    else:
        count = angle.shape[0]
        index = (torch.arange(count, device=flat.device).unsqueeze(1), flat)
        levels = identity.to(entries.dtype).view(1, -1).repeat(count, 1)
        levels = levels.index_put(index, entries.view(count, -1))
    factors = levels.view(*angle.shape[:-1], *identity.shape).unbind(-3)  # B_(L-1) first
    product = factors[0]
    for factor in factors[1:]:
        product = product @ factor if inverse else factor @ product
    return product


# ----------------------------------------------------------- the products
class _GroupChain(torch.autograd.Function):
    r"""Rows ``(N, D)`` times the groups' block-diagonal matrices, one ``bmm`` each, plus ``shift``.

    The data live feature-major, ``(padded, N)``, between groups: every
    group's blocks then meet matrices ``(K, N)`` with unit stride along the
    batch, and each ``bmm`` writes its output in the layout the next group
    reads (the group's bits move from the innermost to the outermost place
    of the index, or back for the inverse direction), so no copies are made
    between groups. The transposition from and to the user's rows is folded
    into the first group's ``bmm`` (forward direction) or the last one's
    (inverse direction) when that group holds the lowest bits; one explicit
    transposition is left per call.

    ``forward`` applies the groups lowest bits first (:math:`W`); the
    inverse direction applies the inverse groups highest bits first
    (:math:`W^{-1}`). The optional ``shift`` (a bias) is added in the last
    pass over the output. The backward pass is two ``bmm`` per group on the
    saved buffers.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, shift: Tensor | None, plan: _Plan, inverse: bool, *mats: Tensor
    ) -> Tensor:
        n, dim = x.shape
        padded, inner, sizes = plan.padded, plan.inner, plan.sizes
        groups = len(sizes)
        x = x.contiguous()
        fused = inner == 1  # the lowest group holds the lowest bits
        saved = []
        if not inverse:
            if fused:
                buf = x if dim == padded else torch.nn.functional.pad(x, (0, padded - dim))
            else:
                buf = _to_inner_major(x, plan)
            for i in range(groups):
                size = sizes[i]
                rest = padded // size
                src = _rows_view(buf, rest, size) if (i == 0 and fused) else buf.view(rest, size, n)
                saved.append(buf)
                buf = x.new_empty(padded, n)
                torch.bmm(mats[i], src, out=buf.view(size, rest, n).transpose(0, 1))
            if shift is None:
                out = buf[:dim].t().contiguous()
            else:  # the shift rides along with the transposition
                out = torch.add(buf[:dim].t(), shift, out=x.new_empty(n, dim))
        else:
            buf = x.new_zeros(padded, n) if dim < padded else x.new_empty(padded, n)
            buf[:dim] = x.t()
            out = None
            for i in reversed(range(groups)):
                size = sizes[i]
                rest = padded // size
                saved.append(buf)
                src = buf.view(size, rest, n).transpose(0, 1)
                if i == 0 and fused:
                    full = x.new_empty(n, padded)
                    torch.bmm(mats[i], src, out=_rows_view(full, rest, size))
                    out = full if dim == padded else full[:, :dim]
                else:
                    buf = x.new_empty(padded, n)
                    torch.bmm(mats[i], src, out=buf.view(rest, size, n))
            if out is None:
                out = _from_inner_major(buf, plan)[:, :dim]
            if shift is not None:
                out.add_(shift)
        ctx.plan, ctx.inverse = plan, inverse
        ctx.save_for_backward(*mats, *saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        plan, inverse = ctx.plan, ctx.inverse
        padded, inner, sizes = plan.padded, plan.inner, plan.sizes
        groups = len(sizes)
        mats, saved = ctx.saved_tensors[:groups], ctx.saved_tensors[groups:]
        need_x = ctx.needs_input_grad[0]
        n, dim = grad.shape
        fused = inner == 1
        grads: list[Tensor | None] = [None] * groups
        grad_x = None
        if not inverse:
            g = grad.new_zeros(padded, n) if dim < padded else grad.new_empty(padded, n)
            g[:dim] = grad.t()
            for i in reversed(range(groups)):
                size = sizes[i]
                rest = padded // size
                g_out = g.view(size, rest, n).transpose(0, 1)
                first = i == 0
                src = (
                    _rows_view(saved[i], rest, size)
                    if (first and fused)
                    else saved[i].view(rest, size, n)
                )
                if ctx.needs_input_grad[4 + i]:
                    grads[i] = torch.bmm(g_out, src.transpose(1, 2))
                if first and not need_x:
                    break
                if first and fused:
                    full = grad.new_empty(n, padded)
                    torch.bmm(mats[i].transpose(1, 2), g_out, out=_rows_view(full, rest, size))
                    grad_x = full[:, :dim]
                else:
                    g = grad.new_empty(padded, n)
                    torch.bmm(mats[i].transpose(1, 2), g_out, out=g.view(rest, size, n))
                    if first:
                        grad_x = _from_inner_major(g, plan)[:, :dim]
        else:
            grad = grad.contiguous()
            if fused:
                full = grad if dim == padded else torch.nn.functional.pad(grad, (0, padded - dim))
            else:
                g = _to_inner_major(grad, plan)
            for j, i in enumerate(range(groups)):
                size = sizes[i]
                rest = padded // size
                g_out = (
                    _rows_view(full, rest, size) if (i == 0 and fused) else g.view(rest, size, n)
                )
                src = saved[groups - 1 - j].view(size, rest, n).transpose(0, 1)
                if ctx.needs_input_grad[4 + i]:
                    grads[i] = torch.bmm(g_out, src.transpose(1, 2))
                last = i == groups - 1
                if last and not need_x:
                    break
                g = grad.new_empty(padded, n)
                torch.bmm(mats[i].transpose(1, 2), g_out, out=g.view(size, rest, n).transpose(0, 1))
                if last:
                    grad_x = g[:dim].t()
        grad_shift = grad.sum(0) if ctx.needs_input_grad[1] else None
        return (grad_x, grad_shift, None, None, *grads)


def _rows_view(rows: Tensor, rest: int, size: int) -> Tensor:
    """``(N, padded)`` rows as ``(rest, size, N)`` matrices (a strided view)."""
    return rows.view(rows.shape[0], rest, size).permute(1, 2, 0)


def _to_inner_major(rows: Tensor, plan: _Plan) -> Tensor:
    """``(N, dim)`` rows to ``(padded, N)``, the never-mixed low bits outermost."""
    n, dim = rows.shape
    if dim < plan.padded:
        rows = torch.nn.functional.pad(rows, (0, plan.padded - dim))
    return (
        rows.view(n, plan.padded // plan.inner, plan.inner).permute(2, 1, 0).reshape(plan.padded, n)
    )


def _from_inner_major(buf: Tensor, plan: _Plan) -> Tensor:
    """The inverse of :func:`_to_inner_major`, to ``(N, padded)``."""
    n = buf.shape[1]
    return (
        buf.view(plan.inner, plan.padded // plan.inner, n).permute(2, 1, 0).reshape(n, plan.padded)
    )


# -------------------------------------------------------------- the layer
class ButterflyLinear(InvertibleLinear):
    r"""An invertible butterfly layer (ButterflyFlow), :math:`y = W x + b` with

    .. math::

        W = B_0 B_1 \cdots B_{L-1},

    where the butterfly factor :math:`B_l` pairs coordinate :math:`j` with
    :math:`j + P / 2^{l+1}` inside each block of :math:`P / 2^l` coordinates
    (:math:`P = 2^{\lceil \log_2 D \rceil}`) and mixes every pair by its own
    invertible 2x2 matrix. So :math:`B_{L-1}` (the smallest stride) acts
    first on :math:`x` and :math:`B_0` (stride :math:`P/2`) last, as in the paper's
    recursion :math:`B^{(N)} = B_N\,\mathrm{diag}(B^{(N/2)}, B^{(N/2)})`. With
    :math:`L = \lceil \log_2 D \rceil` levels (the default) every output can
    depend on every input when D is a power of two.

    **Every dimension D.** The paper needs D divisible by :math:`2^L`. Here
    the D coordinates are the first D of the P slots of a butterfly on
    :math:`P = 2^{\lceil \log_2 D \rceil}` slots, and a pair whose partner
    slot is :math:`\ge D` does not exist: that coordinate passes through the
    level unchanged (no parameters are held for it). The map is exactly
    linear and invertible on :math:`\mathbb{R}^D` and no coordinate is
    added; the work buffers' empty slots stay zero and never enter a block.
    Mixing is then incomplete for D not a power of two: a route between two
    coordinates may need a slot :math:`\ge D`, so one layer connects, e.g.,
    88% of the (input, output) pairs at D = 100 and 96% at D = 1000. Stack
    layers (or add a permutation) where full mixing matters.

    **Blocks.** Each 2x2 block is

    .. math::

        M = \begin{pmatrix} \cos\theta & -\sin\theta \\ \sin\theta & \cos\theta \end{pmatrix}
        \begin{pmatrix} s_1 e^{u} & 0 \\ 0 & s_2 e^{v} \end{pmatrix}
        \begin{pmatrix} 1 & \tau \\ 0 & 1 \end{pmatrix},

    a rotation, a diagonal that never vanishes (fixed signs :math:`s_i = \pm
    1`, a buffer) and a shear: with fixed signs, every invertible 2x2 matrix
    of that determinant sign is reached exactly once, and
    :math:`\log|\det M| = u + v` is exact for every parameter value (no
    :math:`\log|ad - bc|` to evaluate, hence none of the cancellation of
    :math:`\log|a| + \log|d - bc/a|`). All parameters zero is the identity.
    A swap is :math:`\theta = \pi/2, s = (1, -1)`: the layer can express the
    permutations whose routes through the levels never share a slot, e.g.
    the reversal :math:`j \mapsto D - 1 - j` (all blocks swaps, D a power of
    two), cyclic shifts and :math:`j \mapsto j \oplus c`. No single
    butterfly expresses every permutation (the bit reversal, e.g., is not
    one: two of its routes would share a slot).

    **Computation.** A level costs O(D), but applying one level at a time
    takes a full pass over the batch per level. Instead the levels are
    grouped ``block_levels`` at a time: the product of k consecutive levels
    is, for each combination of the other index bits, a dense
    :math:`2^k \times 2^k` block, assembled from the 2x2 factors in
    O(P 2^k) (so O(P log P 2^k / k) for all) and applied to the batch by one
    ``torch.bmm``; the data stay feature-major between groups so that each
    ``bmm`` writes what the next one reads. A call is ``ceil(L /
    block_levels)`` ``bmm`` plus one transposition, O(N P 2^k) flops, both
    directions alike (the inverse assembles the blocks of the inverse 2x2
    factors in reverse order). The backward pass is two ``bmm`` per group.
    :meth:`log_abs_det` is O(D log D), exact: the sum of all :math:`u + v`.
    Under ``no_grad`` the blocks are memoized until a parameter changes.
    ``block_levels`` changes the speed, never the map.

    Parameters: 4 per pair, :math:`2 D \log_2 D` for D a power of two
    (2% of a dense layer's :math:`D^2` at D = 1024), plus the bias.

    Example, mixing the coordinates between a guide's coupling layers (Pyro
    samples with ``_call``), and as a density model's layer (scored with
    ``_inverse``)::

        >>> import torch, pyro, pyro.distributions as dist
        >>> import pyro.distributions.transforms as T
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> from pyro_lunet import butterfly_linear
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.zeros(100), 1.0).to_event(1))
        >>> def flow(dim):
        ...     return T.ComposeTransformModule([
        ...         T.affine_coupling(dim), butterfly_linear(dim, init="orthogonal"),
        ...         T.affine_coupling(dim), butterfly_linear(dim, init="orthogonal")])
        >>> guide = AutoNormalizingFlow(model, flow)
        >>> guide()["z"].shape
        torch.Size([100])
        >>> layer = butterfly_linear(784)  # any D, e.g. MNIST's 784
        >>> density = dist.TransformedDistribution(
        ...     dist.Normal(torch.zeros(784), 1.0).to_event(1), [layer])
        >>> density.log_prob(torch.randn(8, 784)).shape
        torch.Size([8])

    Reference: Meng, Zhou, Choi, Dao, Ermon, "ButterflyFlow: Building
    Invertible Layers with Butterfly Matrices", ICML 2022, arXiv:2209.13774.
    The paper's blocks are free 2x2 matrices (invertible only generically),
    its layers need D divisible by :math:`2^L`, and it applies the levels
    one at a time; the block parametrization, the pass-through construction
    for every D and the grouped products are this library's.

    :param int input_dim: the dimension D.
    :param int num_levels: the number L of levels, from 0 to
        :math:`\lceil \log_2 D \rceil` (``None``, the default: all). Fewer
        levels keep the largest strides: coordinates mix only within their
        class modulo :math:`P / 2^L`.
    :param bool bias: whether to learn a bias.
    :param str init: ``"identity"`` (default: all blocks the identity),
        ``"rotation"`` (each block a uniformly random rotation) or
        ``"orthogonal"`` (each block uniformly random in O(2): a rotation or a
        reflection with equal odds). The last two make :math:`W` orthogonal.
    :param int block_levels: how many levels form one dense block (default
        5, blocks of 32): a speed knob, the map is the same.
    :param int cache_size: 0 or 1, as for Pyro's transforms.
    :param str role: ``"guide"`` (default) or ``"density"``, accepted by every
        family alike and validated; here it changes nothing: both directions
        cost the same (the same number of 2x2 blocks, closed-form inverses).
    """

    def __init__(
        self,
        input_dim: int,
        num_levels: int | None = None,
        bias: bool = True,
        init: Literal["identity", "rotation", "orthogonal"] = "identity",
        block_levels: int = 5,
        cache_size: int = 1,
        role: Role = "guide",
    ):
        super().__init__(input_dim, bias=bias, cache_size=cache_size, role=role)
        bits = (input_dim - 1).bit_length()
        if num_levels is None:
            num_levels = bits
        if isinstance(num_levels, bool) or not isinstance(num_levels, int):
            raise ValueError(f"num_levels must be an int or None, got {num_levels!r}")
        if not 0 <= num_levels <= bits:
            raise ValueError(
                f"num_levels must be in [0, {bits}] for input_dim={input_dim}, got {num_levels}"
            )
        check_positive_int("block_levels", block_levels)
        check_choice("init", init, ("identity", "rotation", "orthogonal"))
        self.num_levels = num_levels
        self.block_levels = block_levels
        self._plan = _make_plan(input_dim, num_levels, block_levels)

        num_pairs, grid_index = _pair_layout(input_dim, num_levels)[1:]
        # Where each slot of the level grid takes its entries from: a pair,
        # or (index num_pairs) the identity of a pass-through coordinate.
        if num_pairs == num_levels * (self._plan.padded // 2):
            self.register_buffer("_grid_index", None, persistent=False)
        else:
            self.register_buffer("_grid_index", grid_index.int(), persistent=False)

        dtype = torch.get_default_dtype()
        angle = torch.zeros(num_pairs, dtype=dtype)
        sign = torch.ones(num_pairs, 2, dtype=dtype)
        if init in ("rotation", "orthogonal"):
            angle.uniform_(-math.pi, math.pi)
        if init == "orthogonal":
            sign[:, 1] = random_signs(num_pairs)
        self.angle = torch.nn.Parameter(angle)
        self.log_scale = torch.nn.Parameter(torch.zeros(num_pairs, 2, dtype=dtype))
        self.shear = torch.nn.Parameter(torch.zeros(num_pairs, dtype=dtype))
        self.register_buffer("block_sign", sign)

    # -------------------------------------------------------- inspection
    def pairs(self) -> Tensor:
        """The blocks' coordinates: ``(num_pairs, 3)`` rows ``(l, j, j + P / 2^(l+1))``.

        ``l`` is the level; rows run from the last level (the first to act
        on :math:`x`) to level 0, in the order of the parameters ``angle``, ``log_scale``,
        ``shear`` and the buffer ``block_sign``.
        """
        return _pair_layout(self.input_dim, self.num_levels)[0]

    def blocks(self) -> Tensor:
        """The 2x2 matrices of the blocks, ``(num_pairs, 2, 2)``, in the order of :meth:`pairs`."""
        return self._entries(inverse=False).view(-1, 2, 2)

    # ------------------------------------------------------------- math
    def _entries(self, inverse: bool) -> Tensor:
        return _block_entries(self.angle, self.log_scale, self.shear, self.block_sign, inverse)

    def _grid(self, inverse: bool) -> Tensor:
        """The entries of every slot of every level, ``(levels, P / 2, 4)``, lowest bit first.

        A pass-through coordinate's slot holds the identity.
        """
        entries = self._entries(inverse)
        if self._grid_index is not None:
            identity = entries.new_tensor([1.0, 0.0, 0.0, 1.0]).unsqueeze(0)
            entries = torch.cat((entries, identity)).index_select(0, self._grid_index)
        return entries.view(self.num_levels, self._plan.padded // 2, 4)

    def _matrices(self, inverse: bool) -> list[Tensor]:
        return self._memo(
            "inverse" if inverse else "forward",
            lambda: _group_matrices(self._grid(inverse), self._plan, inverse),
        )

    def _product(
        self, x: Tensor, mats: list[Tensor], inverse: bool, shift: Tensor | None = None
    ) -> Tensor:
        """Rows of ``M x + shift``, M the forward or inverse map."""
        if not mats:
            return x.clone() if shift is None else x + shift
        return _GroupChain.apply(x, shift, self._plan, inverse, *mats)

    def _matvec(self, x: Tensor) -> Tensor:
        return self._product(x, self._matrices(inverse=False), inverse=False)

    def _solve(self, y: Tensor) -> Tensor:
        return self._product(y, self._matrices(inverse=True), inverse=True)

    # Small D: the map as its dense matrix, the product of the L level
    # matrices, each scattered from its 2x2 blocks in one op: a few ops
    # however many layers a flow has (their matrices are assembled together),
    # and one GEMM applies it. Memoized under no_grad; under grad a flow runs
    # it as a dense kernel.
    def _use_dense_matrix(self) -> bool:
        return self.input_dim <= _DENSE_MAX and self.num_levels > 0

    def _dense_group(self) -> tuple:
        return (self.input_dim, self.num_levels)

    @classmethod
    def _dense_sides(
        cls, layers: list[ButterflyLinear], inverse: bool
    ) -> tuple[Sequence[Tensor], Tensor]:
        """Each layer's dense :math:`W` (or :math:`W^{-1}`) and the sum of their log-dets.

        Cost :math:`O(K L D^3)`, in about 20 ops whatever K.
        """
        angle, log_scale, shear, sign = (
            stack_params([getattr(layer, name) for layer in layers])
            for name in ("angle", "log_scale", "shear", "block_sign")
        )
        products = _level_products(
            layers[0]._level_layout(), inverse, angle, log_scale, shear, sign
        )
        return (products.unbind(0) if angle.dim() > 1 else [products]), log_scale.sum()

    def _level_layout(self) -> tuple[Tensor, Tensor]:
        """Where each block entry goes in the flattened ``(L, D, D)`` level stack, and the
        stack's identity part (1 on the diagonal of coordinates no block of the level
        touches)."""
        layout = self.__dict__.get("_level_layout_cache")
        device = self.angle.device
        if layout is not None and layout[1].device == device:
            return layout
        pairs = self.pairs().to(device)
        levels, dim = self.num_levels, self.input_dim
        step = (levels - 1 - pairs[:, 0]).repeat_interleave(4)  # position in pairs() order
        low, high = pairs[:, 1], pairs[:, 2]
        row = torch.stack((low, low, high, high), 1).reshape(-1)  # a, b, c, d
        col = torch.stack((low, high, low, high), 1).reshape(-1)
        flat = (step * dim + row) * dim + col
        identity = torch.eye(dim, device=device).repeat(levels, 1, 1)
        identity.view(-1)[flat] = 0.0
        layout = (flat, identity)
        self.__dict__["_level_layout_cache"] = layout
        return layout

    # The bias folded into the products' last pass (and, inverse, the blocks
    # assembled once for both W^-1 y and W^-1 b).
    def _affine_rows(self, x: Tensor) -> Tensor:
        if self._use_dense_matrix():
            return self._dense_rows(x, inverse=False)
        return self._product(x, self._matrices(inverse=False), False, self.bias)

    def _inverse_affine_rows(self, y: Tensor) -> Tensor:
        if self._use_dense_matrix():
            return self._dense_rows(y, inverse=True)
        mats = self._matrices(inverse=True)
        shift = None
        if self.bias is not None:
            shift = -self._product(self.bias.unsqueeze(0), mats, inverse=True).squeeze(0)
        return self._product(y, mats, True, shift)

    def _log_abs_det(self) -> Tensor:
        return self.log_scale.sum()

    def _dense(self) -> Tensor:
        ref = self.angle
        eye = torch.eye(self.input_dim, dtype=ref.dtype, device=ref.device)
        return self._matvec(eye).T

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_levels={self.num_levels}, "
            f"block_levels={self.block_levels}"
        )


def _pair_layout(dim: int, levels: int) -> tuple[Tensor, int, Tensor]:
    """The pairs (from the last level back), their number, and the grid-to-pair index.

    Grid row ``r`` is the level on bit ``bits - levels + r``; its slot ``q``
    is the pair whose lower coordinate is ``q`` with a zero bit inserted at
    that bit, and the index points to that pair's row, or to ``num_pairs``
    (the identity) where the partner would be ``>= dim``.
    """
    bits = (dim - 1).bit_length()
    half = (1 << bits) // 2
    q = torch.arange(half)
    rows, index = [], []
    count = 0
    for level in reversed(range(levels)):
        bit = bits - 1 - level
        stride = 1 << bit
        low = (q >> bit << (bit + 1)) | (q & (stride - 1))
        low = low[low + stride < dim]
        ids = torch.full((half,), -1, dtype=torch.long)
        ids[low - ((low >> (bit + 1)) << bit)] = torch.arange(count, count + low.numel())
        count += low.numel()
        rows.append(torch.stack((torch.full_like(low, level), low, low + stride), 1))
        index.append(ids)
    pairs = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)
    grid = torch.stack(index) if index else torch.zeros(0, half, dtype=torch.long)
    grid = torch.where(grid < 0, torch.full_like(grid, count), grid)
    return pairs, count, grid.reshape(-1)


def butterfly_linear(input_dim: int, **kwargs) -> ButterflyLinear:
    """A :class:`ButterflyLinear` of dimension ``input_dim``; keywords as for the class."""
    return ButterflyLinear(input_dim, **kwargs)


register_family("butterfly", butterfly_linear, directional=False, maintenance=False)
