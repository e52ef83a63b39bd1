r"""LU-factored invertible linear layers (LU-Net)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._fused import (
    KERNEL_MAX_DIM,
    LUKernel,
    gradients_with_graph,
    run_kernels,
)
from .base import (
    InvertibleLinear,
    LegacyDirection,
    Role,
    check_square_matrix,
    haar_orthogonal,
    resolve_role,
)
from .registry import register_family

__all__ = ["LULinear", "lu_linear"]

# Below this size one dense GEMM beats the blocked triangular kernels.
_BLOCK_MIN = 128
_MAX_BLOCKS = 8


def _block_bounds(dim: int) -> list[int]:
    blocks = max(1, min(_MAX_BLOCKS, dim // _BLOCK_MIN))
    return [round(i * dim / blocks) for i in range(blocks + 1)]


def _tri_matmul(x: Tensor, t: Tensor, lower: bool, bounds: list[int]) -> Tensor:
    """``x @ t.T`` for triangular ``t``, skipping its zero blocks.

    Blocks of output columns are written in place, each by one GEMM over the
    part of ``t``'s block row that is nonzero, so about ``(k + 1) / 2k`` of a
    dense product's flops are spent for ``k`` blocks.
    """
    out = x.new_empty(x.shape[0], t.shape[0])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        cols = slice(0, stop) if lower else slice(start, None)
        torch.mm(x[:, cols], t[start:stop, cols].T, out=out[:, start:stop])
    return out


def _packed_gradient(
    grad_y: Tensor,
    z: Tensor,
    grad_z: Tensor,
    x: Tensor,
    u_diag: Tensor,
    bounds: list[int],
    shift: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    r"""The gradient of the packed factors from rows (batch first, ``(N, D)``) of
    ``y = L z`` and ``z = U (x - s)``: :math:`G_L = g_y^\top z` strictly below the
    diagonal, :math:`G_U = g_z^\top (x - 1 s^\top)` above it, and on it
    :math:`(G_U)_{ii} U_{ii}` (the derivative through :math:`U_{ii} = s_i e^{d_i}`).

    Written block row by block row, each by GEMMs over the triangle's part of
    it only: about ``(k + 1) / 2k`` of two dense products' flops for ``k`` blocks
    (``shift``, ``(s, 1^\top g_z)``, is a rank-one correction: one more pass over
    the upper triangle).
    """
    grad_packed = grad_y.new_empty(grad_y.shape[1], x.shape[1])
    for start, stop in zip(bounds[:-1], bounds[1:]):
        rows = slice(start, stop)
        gy, gz = grad_y[:, rows], grad_z[:, rows]
        torch.mm(gy.T, z[:, :start], out=grad_packed[rows, :start])
        torch.mm(gz.T, x[:, stop:], out=grad_packed[rows, stop:])
        block_l = gy.T @ z[:, rows]
        block_u = gz.T @ x[:, rows]
        if shift is not None:
            s, column_sums = shift
            grad_packed[rows, stop:].addr_(column_sums[rows], s[stop:], alpha=-1.0)
            block_u.addr_(column_sums[rows], s[rows], alpha=-1.0)
        block = block_l.tril(-1) + block_u.triu(1)
        block.diagonal().copy_(block_u.diagonal() * u_diag[rows])
        grad_packed[rows, rows] = block
    return grad_packed


def _factors(packed: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """The dense factors ``(L, U)`` of ``packed`` and ``sign``, by differentiable ops."""
    eye = torch.eye(packed.shape[0], dtype=packed.dtype, device=packed.device)
    return packed.tril(-1) + eye, packed.triu(1) + torch.diag(sign * packed.diagonal().exp())


def _solve_rows(y: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """``(z, x)`` with :math:`L z = y^\top`, :math:`U x = z`: the batch as columns. LAPACK's
    left-side solves on the transposed view run about twice as fast as right-side solves on
    the rows (measured at D = N = 1024: a density step 0.75x of the row-wise one)."""
    z = torch.linalg.solve_triangular(lower, y.T, upper=False, unitriangular=True)
    return z, torch.linalg.solve_triangular(upper, z, upper=True)


class _LUSolve(torch.autograd.Function):
    """Rows of ``(L U)^-1 y`` from the packed factors, with a structure-aware backward.

    The backward's two solves give the gradients of ``y`` and, by GEMMs over
    the triangles only (:func:`_packed_gradient`), of L and U, written into
    the packed gradient (L's strictly below the diagonal, U's on and above
    it, negated once): autograd's own
    backward of two triangular solves takes the triangle of each dense
    gradient, negates it, and adds the dense factors' assembly on top (at
    D = N = 1024 about 15 ms of a 60 ms density step in ``tril``, ``triu``,
    ``neg`` and ``fill_``). Cost: forward 2 triangular solves (each
    :math:`N D^2`), backward 2 solves and two triangles' GEMMs (about
    :math:`N D^2` in all). Under ``create_graph=True``
    the backward is itself differentiable (recomputed by autograd's ops).
    """

    @staticmethod
    def forward(ctx, y: Tensor, packed: Tensor, sign: Tensor) -> Tensor:
        lower = packed.tril(-1)
        lower.diagonal().fill_(1.0)
        upper = packed.triu(1)
        upper.diagonal().copy_(sign * packed.diagonal().exp())
        z, x = _solve_rows(y, lower, upper)
        ctx.save_for_backward(y, packed, sign, z, x, lower, upper)
        return x.T

    @staticmethod
    def backward(ctx, grad_x: Tensor):
        y, packed, sign, z, x, lower, upper = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            recomputed = _solve_rows(y, *_factors(packed, sign))[1].T
            grads = gradients_with_graph([recomputed], [grad_x], [y, packed], needs[:2])
            return grads[0], grads[1], None
        # x = U^-1 z, z = L^-1 y^T: grad_z = U^-T grad_x, grad_y = L^-T grad_z,
        # grad_U = -grad_z x^T, grad_L = -grad_y z^T (columns as the batch).
        grad_z = torch.linalg.solve_triangular(upper.T, grad_x.T, upper=False)
        grad_y = torch.linalg.solve_triangular(lower.T, grad_z, upper=True, unitriangular=True)
        grad_packed = None
        if needs[1]:  # the batch is the columns here: the transposes are its rows
            bounds = _block_bounds(packed.shape[0])
            grad_packed = _packed_gradient(grad_y.T, z.T, grad_z.T, x.T, upper.diagonal(), bounds)
            grad_packed.neg_()
        return (grad_y.T if needs[0] else None), grad_packed, None


class _LUProduct(torch.autograd.Function):
    r"""Rows of ``L U (x - shift)`` from the packed factors, with a structure-aware backward.

    ``packed`` holds L strictly below its diagonal, U strictly above it and
    ``log|U_ii|`` on it; ``sign`` holds ``sign(U_ii)``. The backward writes
    the gradient of ``packed`` block by block, so neither pass spends flops on
    the zero halves of L and U. ``shift`` (a bias, or ``None``) enters as
    :math:`U (x - s) = U x - U s`: its gradient is
    :math:`-U^\top \sum_n (g_z)_n`, one matrix-vector product, so data that
    needs no gradient gets none computed (a batch's gradient is a third
    triangular GEMM). Under ``create_graph=True`` the backward is itself
    differentiable (see :meth:`_differentiable_backward`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, sign: Tensor, shift: Tensor | None):
        diag = sign * packed.diagonal().exp()
        lower = packed.tril(-1)
        lower.diagonal().fill_(1.0)
        upper = packed.triu(1)
        upper.diagonal().copy_(diag)
        bounds = _block_bounds(packed.shape[0])
        z = _tri_matmul(x, upper, lower=False, bounds=bounds)
        if shift is not None:
            z.sub_(upper @ shift)
        y = _tri_matmul(z, lower, lower=True, bounds=bounds)
        # The inputs too (saving them costs no memory): a double backward
        # rebuilds the factors from them to stay on their graph.
        ctx.save_for_backward(x, packed, sign, shift, z, lower, upper)
        ctx.bounds = bounds
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        # Autograd runs a backward in grad mode exactly when create_graph=True.
        if torch.is_grad_enabled():
            return _LUProduct._differentiable_backward(ctx, grad_y)
        x, _, _, shift, z, lower, upper = ctx.saved_tensors
        needs, bounds = ctx.needs_input_grad, ctx.bounds
        # z = (x - s) U^T, y = z L^T: grad_z = grad_y L, grad_x = grad_z U.
        grad_z = _tri_matmul(grad_y, lower.T, lower=False, bounds=bounds)
        grad_x = _tri_matmul(grad_z, upper.T, lower=True, bounds=bounds) if needs[0] else None
        # The shift's share: 1^T grad_z, once for both its gradient and the packed one's.
        column_sums = None if shift is None else grad_z.sum(0)
        grad_packed = grad_shift = None
        if needs[1]:
            rank_one = None if shift is None else (shift, column_sums)
            grad_packed = _packed_gradient(grad_y, z, grad_z, x, upper.diagonal(), bounds, rank_one)
        if needs[3]:
            grad_shift = -(column_sums @ upper)
        return grad_x, grad_packed, None, grad_shift

    @staticmethod
    def _differentiable_backward(ctx, grad_y: Tensor):
        """The backward above by dense out-of-place ops on the saved inputs.

        Autograd records neither writes into preallocated outputs nor the
        factors assembled inside :meth:`forward` (no graph back to
        ``packed``), so this path rebuilds the factors from ``packed`` and
        spends five dense GEMMs, about :math:`10 N D^2` flops against the
        blocked :math:`4 N D^2`, paid only by gradients of gradients.
        """
        x, packed, sign, shift = ctx.saved_tensors[:4]
        needs = ctx.needs_input_grad
        lower, upper = _factors(packed, sign)
        if shift is not None:
            x = x - shift
        grad_z = grad_y @ lower
        grad_input = grad_z @ upper if needs[0] or needs[3] else None
        grad_packed = None
        if needs[1]:
            grad_lower = grad_y.T @ (x @ upper.T)
            grad_upper = grad_z.T @ x
            grad_packed = (
                grad_lower.tril(-1)
                + grad_upper.triu(1)
                + torch.diag(grad_upper.diagonal() * upper.diagonal())
            )
        grad_shift = -grad_input.sum(0) if needs[3] else None
        return (grad_input if needs[0] else None), grad_packed, None, grad_shift


class LULinear(InvertibleLinear):
    r"""An invertible linear layer held as an LU factorization (LU-Net),

    .. math::

        y = W x + b, \qquad W = L U \quad\text{or}\quad W = (L U)^{-1},

    with :math:`L` unit lower triangular and :math:`U` upper triangular with
    diagonal :math:`U_{ii} = s_i \exp(d_i)`, :math:`s_i = \pm 1` fixed. The
    diagonal can never vanish, so the layer is invertible for every parameter
    value, and :math:`\log|\det W| = \pm\sum_i d_i` costs O(D).

    One direction is a product with the triangular factors and the other is
    two triangular solves (never a dense inverse). ``role`` says which
    direction gets the product: ``"guide"`` (default; :math:`W = LU`, the
    paper's form, fast sampling ``_call``: for variational guides) or
    ``"density"`` (:math:`W^{-1} = LU`, fast scoring ``_inverse``: for density
    models, whose ``log_prob`` runs the inverse).

    Costs for a batch of N, in flops: the product direction about
    :math:`N D^2` with gradients (blocked triangular GEMMs skip the zero
    halves of the factors), or one dense :math:`2 N D^2` GEMM on a memoized
    :math:`LU` under ``no_grad``; the solve direction :math:`2 N D^2` in
    two triangular solves; the log-determinant O(D). Both directions have
    gradients of every order (``create_graph=True``, as in gradient
    penalties and Hessian-vector products); a double backward through the
    blocked product uses dense GEMMs, about :math:`10 N D^2` flops.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import lu_linear
        >>> layer = lu_linear(3, role="density")   # a density model's layer
        >>> flow = dist.TransformedDistribution(
        ...     dist.Normal(torch.zeros(3), 1.0).to_event(1), [layer])
        >>> flow.log_prob(torch.randn(5, 3)).shape
        torch.Size([5])

    Reference: Chan, Penquitt, Gottschalk, "LU-Net: Invertible Neural
    Networks Based on Matrix Factorization", IJCNN 2023, arXiv:2302.10524.

    :param int input_dim: the dimension D.
    :param bool bias: whether to learn a bias.
    :param init: ``"identity"`` (default), ``"orthogonal"`` (a Haar-random
        orthogonal :math:`W`: the LU factors of a permuted random orthogonal
        matrix, itself random orthogonal), or a ``(D, D)`` tensor, the initial
        :math:`W`, which must have an LU factorization without pivoting.
    :param str role: ``"guide"`` (default) or ``"density"``: the direction
        computed by triangular products is sampling or scoring.
    :param int cache_size: 0 or 1, as for Pyro's transforms.
    :param str product: deprecated spelling of ``role`` (``"forward"`` is
        ``role="guide"``, ``"inverse"`` ``role="density"``); warns, and is
        removed in the next release.
    """

    def __init__(
        self,
        input_dim: int,
        bias: bool = True,
        init: Literal["identity", "orthogonal"] | Tensor = "identity",
        role: Role | None = None,
        cache_size: int = 1,
        *,
        product: Literal["forward", "inverse"] | None = None,
    ):
        role = resolve_role(role, "guide", product=product)
        super().__init__(input_dim, bias=bias, cache_size=cache_size, role=role)
        packed, sign = _initial_factors(input_dim, init, role)
        self.packed = torch.nn.Parameter(packed)
        self.register_buffer("diag_sign", sign)

    def lower_upper(self) -> tuple[Tensor, Tensor]:
        """The factors ``(L, U)`` as dense matrices, differentiable."""
        return _factors(self.packed, self.diag_sign)

    # Rows of LU x and (LU)^-1 y; the direction decides which serves _matvec.
    def _product(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return x @ self._memo("lu_t", lambda: torch.mm(*self.lower_upper()).T)
        if self.input_dim < 2 * _BLOCK_MIN:  # one block: plain autograd is leaner
            return x @ torch.mm(*self.lower_upper()).T
        return _LUProduct.apply(x, self.packed, self.diag_sign, None)

    def _triangular_solve(self, y: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.input_dim >= 2 * _BLOCK_MIN:
            return _LUSolve.apply(y, self.packed, self.diag_sign)
        return _solve_rows(y, *self.lower_upper())[1].T

    product = LegacyDirection()  # deprecated: read .role

    # Small D: the product side, its bias and log|det| as one kernel (one
    # autograd node, shared with the neighbouring steps inside a flow); the
    # base's separate passes for large D.
    def _kernel(self, inverse: bool) -> tuple[LUKernel, tuple] | None:
        if (
            self.input_dim >= KERNEL_MAX_DIM
            or inverse != (self.role == "density")
            or not torch.is_grad_enabled()  # the memoized product is cheaper then
        ):
            return None
        # role="density" inverts by x = L U (y - b), and log|det dy/dx| = -sum d_i
        return LUKernel(subtract=inverse, log_det_sign=-1.0 if inverse else 1.0), (
            self.packed, self.diag_sign, self.bias,
        )  # fmt: skip

    def _affine_rows(self, x: Tensor) -> Tensor:
        kernel = self._kernel(inverse=False)
        return super()._affine_rows(x) if kernel is None else run_kernels([kernel], x)[0]

    def _inverse_affine_rows(self, y: Tensor) -> Tensor:
        kernel = self._kernel(inverse=True)
        if kernel is not None:
            return run_kernels([kernel], y)[0]
        if self.bias is not None and torch.is_grad_enabled() and self.input_dim >= 2 * _BLOCK_MIN:
            # The base's W^-1 y - W^-1 b spares a batch gradient, at the price of a second
            # kernel call (about 9 ms at D = 1024); here neither is needed: the solve's
            # backward computes the batch's gradient anyway, and the product takes the
            # bias inside.
            if self.role == "guide":
                return _LUSolve.apply(y - self.bias, self.packed, self.diag_sign)
            return _LUProduct.apply(y, self.packed, self.diag_sign, self.bias)
        return super()._inverse_affine_rows(y)

    def _matvec(self, x: Tensor) -> Tensor:
        return self._product(x) if self.role == "guide" else self._triangular_solve(x)

    def _solve(self, y: Tensor) -> Tensor:
        return self._triangular_solve(y) if self.role == "guide" else self._product(y)

    def _log_abs_det(self) -> Tensor:
        log_det = self.packed.diagonal().sum()
        return log_det if self.role == "guide" else -log_det

    def _dense(self) -> Tensor:
        lower, upper = self.lower_upper()
        if self.role == "guide":
            return lower @ upper
        eye = torch.eye(self.input_dim, dtype=lower.dtype, device=lower.device)
        inv_lower = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, inv_lower, upper=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, role={self.role!r}"


def _initial_factors(dim: int, init, role: str) -> tuple[Tensor, Tensor]:
    """``(packed, sign)`` for the requested initial matrix."""
    if isinstance(init, Tensor):
        matrix = check_square_matrix("init matrix", init, dim)
        if role == "density":  # the factors hold W^-1
            matrix = torch.linalg.inv(matrix)
        lower, upper = _lu_without_pivoting(matrix)
    elif init == "identity":
        return torch.zeros(dim, dim), torch.ones(dim)
    elif init == "orthogonal":
        _, lower, upper = torch.linalg.lu(haar_orthogonal(dim))  # L U = P^T q, orthogonal too
    else:
        raise ValueError(f"init must be 'identity', 'orthogonal' or a tensor, got {init!r}")
    diag = upper.diagonal()
    packed = lower.tril(-1) + upper.triu(1) + torch.diag(diag.abs().log())
    return packed.to(torch.get_default_dtype()), torch.sign(diag).to(torch.get_default_dtype())


def _lu_without_pivoting(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Doolittle factors of ``matrix`` (float64), or a ``ValueError`` if a pivot vanishes."""
    a = matrix.clone()
    dim = a.shape[0]
    scale = a.abs().max().clamp_min(torch.finfo(a.dtype).tiny)
    for k in range(dim):
        pivot = a[k, k]
        if not torch.isfinite(pivot) or pivot.abs() <= 1e-10 * scale:
            raise ValueError(
                "init matrix has no stable LU factorization without pivoting "
                f"(pivot {k} is {pivot.item():.3g}); permute its rows first"
            )
        a[k + 1 :, k] /= pivot
        a[k + 1 :, k + 1 :] -= torch.outer(a[k + 1 :, k], a[k, k + 1 :])
    eye = torch.eye(dim, dtype=a.dtype)
    return a.tril(-1) + eye, a.triu()


def lu_linear(input_dim: int, **kwargs) -> LULinear:
    """A :class:`LULinear` of dimension ``input_dim``; keywords as for the class.

    ``role="guide"`` (default) puts the triangular products on sampling,
    ``role="density"`` on scoring.
    """
    return LULinear(input_dim, **kwargs)


register_family("lu", lu_linear, directional=True, maintenance=False)
