r"""Circulant-diagonal invertible linear layers (CDFlow)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._fused import stack_params
from .base import InvertibleLinear, Role, check_choice, check_positive_int, random_signs
from .registry import register_family

__all__ = ["CirculantDiagonalLinear", "circulant_diagonal_linear"]

# On CPU a batch is pushed through the whole chain of factors one block of
# rows at a time, so every temporary stays in cache and is recycled by the
# allocator instead of being faulted in afresh (about 3x faster at D = 1024).
# The block holds about this many bytes per intra-op thread.
_BLOCK_BYTES = 1 << 19

# Up to this size the layer is applied as its dense matrix (see _dense_sides).
# Measured (activation_flow(D, 4), one thread, dense / FFT-chain step time):
# guide 0.54 at D = 64, 0.72 at 128, 1.50 at 256; density 0.54, 0.68, 1.16.
_DENSE_MAX = 128


def _block_rows(x: Tensor) -> int:
    rows, dim = x.shape
    if x.device.type != "cpu":
        return max(rows, 1)  # one pass: the device allocator caches, launches cost
    block_bytes = _BLOCK_BYTES * torch.get_num_threads()
    return max(1, min(rows, block_bytes // (dim * x.element_size())))


def _bin_multiplicity(dim: int, like: Tensor) -> Tensor:
    """How often each rfft bin occurs in the full spectrum: 1, 2, ..., 2 (, 1 if D is even)."""
    mult = torch.full((dim // 2 + 1,), 2.0, dtype=like.dtype, device=like.device)
    mult[0] = 1.0
    if dim % 2 == 0:
        mult[-1] = 1.0
    return mult


class _CirculantDiagonalChain(torch.autograd.Function):
    r"""Rows of ``a[m-1] * C[m-2](... C[0](a[0] * (x + pre)) ...) + post``.

    ``a`` is ``(m, D)`` (the diagonals in the order they are applied) and
    ``C[k] v = irfft(rfft(v) * h[k], n=D, norm="forward")`` for the ``(m-1, K)``
    half-spectra ``h``, which carry the ``1/D`` of the inverse FFT (so no
    transform spends a pass on normalization). ``pre``/``post`` may be ``None``.

    Rows are processed in cache-sized blocks. For the gradients that are
    needed, the forward keeps each block's conjugated spectra of the inputs of
    the circulant factors (and the inputs of the middle diagonals when m > 2);
    the input of the last diagonal is recovered from the output, and the
    gradients of ``pre`` and ``post`` need only the column sums of ``grad``. So
    a training step costs 4 (m - 1) FFTs of the batch, as few as the chain
    rule allows, and a handful of passes over cache-resident blocks.
    """

    @staticmethod
    def forward(ctx, x, pre, post, scales, spectra):
        dim = x.shape[1]
        block = _block_rows(x)
        need_x, need_pre, need_post, need_scales, need_spectra = ctx.needs_input_grad
        a, h = scales.unbind(0), spectra.unbind(0)
        out = torch.empty_like(x)
        work = x.new_empty(block, dim)
        saved_u, saved_v = [], []  # by block, then factor
        for x_block, out_block in zip(x.split(block), out.split(block)):
            w = work if x_block.shape[0] == block else work[: x_block.shape[0]]
            if pre is None:
                torch.mul(x_block, a[0], out=w)
            else:
                torch.add(x_block, pre, out=w).mul_(a[0])
            for k, h_k in enumerate(h):
                u = torch.fft.rfft(w)
                if need_spectra:
                    saved_u.append(u.conj_physical())
                v = torch.fft.irfft(u.mul_(h_k), n=dim, norm="forward")
                if k < len(h) - 1:
                    if need_scales:
                        saved_v.append(v)
                    torch.mul(v, a[k + 1], out=w)
                elif post is None:
                    torch.mul(v, a[-1], out=out_block)
                else:
                    torch.addcmul(post, v, a[-1], out=out_block)
        ctx.num_saved_u = len(saved_u)
        ctx.save_for_backward(x, pre, post, scales, spectra, out, *saved_u, *saved_v)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, pre, post, scales, spectra, out, *saved = ctx.saved_tensors
        need_x, need_pre, need_post, need_scales, need_spectra = ctx.needs_input_grad
        saved_u, saved_v = saved[: ctx.num_saved_u], saved[ctx.num_saved_u :]
        dim = x.shape[1]
        m = scales.shape[0]
        block = _block_rows(x)
        a = scales.unbind(0)
        conj_spectra = spectra.conj().resolve_conj()
        conj_h = conj_spectra.unbind(0)
        # Row-wise accumulators, reduced over their rows at the end.
        acc_scales = x.new_zeros(m, block, dim) if need_scales else None
        acc_spectra = spectra.new_zeros(m - 1, block, dim // 2 + 1) if need_spectra else None
        acc_a = acc_scales.unbind(0) if need_scales else ()
        acc_h = acc_spectra.unbind(0) if need_spectra else ()
        grad_x = torch.empty_like(x) if need_x else None
        work = x.new_empty(block, dim)
        cur = x.new_empty(block, dim)
        blocks = zip(
            x.split(block),
            out.split(block),
            grad.split(block),
            grad_x.split(block) if need_x else itertools.repeat(None),
        )
        for i, (x_block, out_block, g, grad_x_block) in enumerate(blocks):
            r = g.shape[0]
            if r < block:  # the last block, shorter
                acc_a, acc_h = [t[:r] for t in acc_a], [t[:r] for t in acc_h]
                work, cur = work[:r], cur[:r]
            if need_scales:  # the last diagonal's input is (out - post) / a[-1]
                last = out_block if post is None else torch.sub(out_block, post, out=work)
                acc_a[-1].addcmul_(g, last)
            c = torch.mul(g, a[-1], out=cur)
            for k in range(m - 2, -1, -1):
                spec = torch.fft.rfft(c)
                if need_spectra:
                    acc_h[k].addcmul_(saved_u[i * (m - 1) + k], spec)
                gu = torch.fft.irfft(spec.mul_(conj_h[k]), n=dim, norm="forward")
                if need_scales:
                    if k > 0:
                        v = saved_v[i * (m - 2) + k - 1]
                    elif pre is None:
                        v = x_block
                    else:
                        v = torch.add(x_block, pre, out=work)
                    acc_a[k].addcmul_(gu, v)
                if k > 0:
                    c = torch.mul(gu, a[k], out=cur)
                elif need_x:
                    torch.mul(gu, a[0], out=grad_x_block)
        grad_scales = grad_spectra = grad_pre = grad_post = None
        if need_scales:
            grad_scales = acc_scales.sum(1)
            grad_scales[-1] /= scales[-1]
        if need_spectra:
            grad_spectra = acc_spectra.sum(1) * _bin_multiplicity(dim, x)
        if need_pre or need_post:
            grad_post = grad.sum(0)
            if need_pre:  # the sum over rows of grad_x: the chain's transpose on one row
                grad_pre = _transposed_chain(grad_post, scales, conj_spectra)
        return grad_x, grad_pre, grad_post if need_post else None, grad_scales, grad_spectra


def _transposed_chain(g: Tensor, scales: Tensor, conj_spectra: Tensor) -> Tensor:
    """``J^T g`` for the chain's matrix ``J`` (without offsets) and one vector ``g``."""
    dim = g.shape[-1]
    g = g * scales[-1]
    for k in range(scales.shape[0] - 2, -1, -1):
        g = torch.fft.irfft(torch.fft.rfft(g) * conj_spectra[k], n=dim, norm="forward")
        g = g * scales[k]
    return g


def _half_spectra(
    phase: Tensor, log_magnitude: Tensor, spectrum_sign: Tensor, power: float, log_norm: float
) -> Tensor:
    """``lambda ** power / exp(log_norm)`` over any leading dims: exact real bins,
    Hermitian by construction."""
    zeros = phase.new_zeros(spectrum_sign.shape)
    cos = torch.cat([spectrum_sign[..., :1], phase.cos(), spectrum_sign[..., 1:]], dim=-1)
    sin = torch.cat([zeros[..., :1], power * phase.sin(), zeros[..., 1:]], dim=-1)
    magnitude = (power * log_magnitude - log_norm).exp()
    return torch.complex(magnitude * cos, magnitude * sin)


class CirculantDiagonalLinear(InvertibleLinear):
    r"""An invertible linear layer that alternates diagonal and circulant factors (CDFlow),

    .. math::

        y = W x + b, \qquad W = D_1 C_2 D_3 \cdots C_{2m-2} D_{2m-1},

    with :math:`m` = ``num_factors`` diagonal factors and :math:`m - 1`
    circulant ones. A diagonal is :math:`D_{2j-1} = \operatorname{diag}(\sigma
    \odot e^{\ell})` with fixed signs :math:`\sigma = \pm 1`. A circulant
    :math:`C_{2j} = \operatorname{circ}(c)`, :math:`(C v)_i = \sum_l c_{(i-l)
    \bmod D} v_l`, is held by its eigenvalues :math:`\lambda = \operatorname{fft}(c)`,
    stored as the half-spectrum :math:`k = 0, \dots, \lfloor D/2 \rfloor` that
    ``rfft`` uses:

    .. math::

        \lambda_k = e^{s_k + i\theta_k} \;(0 < k < D/2), \qquad
        \lambda_0 = \tau_0 e^{s_0}, \qquad \lambda_{D/2} = \tau_{D/2} e^{s_{D/2}}
        \;(D \text{ even}),

    with fixed signs :math:`\tau = \pm 1` for the two real bins, and
    :math:`\lambda_{D-k} = \bar\lambda_k` implied. The spectrum is Hermitian by
    construction, so :math:`c` and the map are real, and no diagonal entry or
    eigenvalue can vanish: the layer is invertible for every parameter value,
    with

    .. math::

        \log|\det W| = \sum_j \sum_i \ell_{j,i}
            + \sum_j \Big(s_{j,0} + 2 \sum_{0<k<D/2} s_{j,k} + s_{j,D/2}\Big),

    the last term only when D is even. Every D >= 1 works, odd or even (for
    D = 1 and 2 every bin is real and there is no phase). The parameters are
    ``log_scale`` (:math:`\ell`, ``(m, D)``, row j for :math:`D_{2j+1}`),
    ``log_magnitude`` (:math:`s`, ``(m-1, D//2+1)``), ``phase``
    (:math:`\theta`, ``(m-1, (D-1)//2)``) and the bias; the signs are the
    buffers ``scale_sign`` and ``spectrum_sign``. That is :math:`(2m - 1) D`
    numbers plus the bias, as many as the paper's real vectors.

    Costs for a batch of N: either direction is :math:`2(m-1)` real FFTs
    (``rfft``/``irfft``), :math:`O(m N D \log D)`, the inverse dividing by
    each spectrum (a product with :math:`1/\lambda = e^{-s - i\theta}`); a
    training step is :math:`4(m-1)` FFTs, with a hand-written backward that
    reuses the forward's spectra; rows go through the whole chain in
    cache-sized blocks, with the bias and the FFT normalization folded into
    the diagonal and spectral products. The log-determinant is a weighted sum
    of parameters, :math:`O(m D)`. ``weight()`` assembles the dense :math:`W`
    in :math:`O(m D^3)`, for inspection only.

    Example::

        >>> import torch, pyro.distributions as dist
        >>> from pyro_lunet import circulant_diagonal_linear
        >>> layer = circulant_diagonal_linear(6, num_factors=3, init="orthogonal")
        >>> flow = dist.TransformedDistribution(
        ...     dist.Normal(torch.zeros(6), 1.0).to_event(1), [layer])
        >>> flow.log_prob(torch.randn(5, 6)).shape
        torch.Size([5])
        >>> torch.allclose(layer.weight() @ layer.weight().T, torch.eye(6), atol=1e-5)
        True

    Reference: Feng, Liao, "CDFlow: Building Invertible Layers with Circulant
    and Diagonal Matrices", NeurIPS 2025, arXiv:2510.25323.

    Differences from the paper: the paper trains the diagonal vectors and the
    time-domain circulant vectors :math:`c` directly, so a diagonal entry or
    an eigenvalue of :math:`C` that reaches zero makes the layer singular;
    here each factor is held as log-magnitudes, phases and fixed signs, which
    covers every invertible real diagonal and circulant with the signs chosen
    at initialization (a sign can only change by passing through a singular
    matrix, as for the diagonal of :class:`~pyro_lunet.LULinear`). The map is
    the same.

    :param int input_dim: the dimension D.
    :param int num_factors: m >= 2, the number of diagonal factors (the number
        of circulant factors is one less); 2, :math:`D C D`, is the practical choice.
    :param bool bias: whether to learn a bias.
    :param str init: ``"identity"`` (default; :math:`W = I`) or
        ``"orthogonal"``, a random orthogonal :math:`W` (not Haar-distributed):
        random :math:`\pm 1` diagonals and circulants with unit-modulus spectra,
        uniform random phases and random signs of the real bins.
    :param int cache_size: 0 or 1, as for Pyro's transforms.
    :param str role: ``"guide"`` (default) or ``"density"``, accepted by every
        family alike and validated; here it changes nothing: both directions
        cost the same (the same FFTs and diagonal scalings).
    """

    def __init__(
        self,
        input_dim: int,
        num_factors: int = 2,
        bias: bool = True,
        init: Literal["identity", "orthogonal"] = "identity",
        cache_size: int = 1,
        role: Role = "guide",
    ):
        super().__init__(input_dim, bias=bias, cache_size=cache_size, role=role)
        check_positive_int("num_factors", num_factors, minimum=2)
        check_choice("init", init, ("identity", "orthogonal"))
        self.num_factors = num_factors
        dim, m = input_dim, num_factors
        num_bins, num_phases, num_real = dim // 2 + 1, (dim - 1) // 2, 2 - dim % 2
        self.log_scale = torch.nn.Parameter(torch.zeros(m, dim))
        self.log_magnitude = torch.nn.Parameter(torch.zeros(m - 1, num_bins))
        self.phase = torch.nn.Parameter(torch.zeros(m - 1, num_phases))
        scale_sign, spectrum_sign = torch.ones(m, dim), torch.ones(m - 1, num_real)
        if init == "orthogonal":
            with torch.no_grad():
                self.phase.uniform_(-math.pi, math.pi)
            scale_sign = random_signs(m, dim)
            spectrum_sign = random_signs(m - 1, num_real)
        self.register_buffer("scale_sign", scale_sign)
        self.register_buffer("spectrum_sign", spectrum_sign)
        # log|det| weights of the half-spectrum's bins; derived, so not saved.
        mult = _bin_multiplicity(dim, self.log_magnitude)
        self.register_buffer("bin_multiplicity", mult, persistent=False)

    # ------------------------------------------------------------- factors
    def diagonals(self) -> Tensor:
        """The ``(m, D)`` diagonals of :math:`D_1, D_3, \\dots, D_{2m-1}`, differentiable."""
        return self.scale_sign * self.log_scale.exp()

    def spectra(self, inverse: bool = False) -> Tensor:
        r"""The ``(m-1, D//2+1)`` complex half-spectra :math:`\lambda` of :math:`C_2, C_4, \dots`.

        With ``inverse=True``, those of their inverses, :math:`1/\lambda`.
        """
        return self._half_spectra(-1.0 if inverse else 1.0, 0.0)

    def circulant_vectors(self) -> Tensor:
        r"""The real ``(m-1, D)`` time-domain vectors of :math:`C_{2j} = \operatorname{circ}(c_j)`.

        Differentiable; :math:`O(m D \log D)`.
        """
        return torch.fft.irfft(self.spectra(), n=self.input_dim)

    def _half_spectra(self, power: float, log_norm: float) -> Tensor:
        return _half_spectra(self.phase, self.log_magnitude, self.spectrum_sign, power, log_norm)

    def _chain_factors(self, inverse: bool) -> tuple[Tensor, Tensor]:
        """The diagonals and ``1/D``-scaled half-spectra in the order they are applied."""
        log_dim = math.log(self.input_dim)
        if inverse:  # W^-1 = D_(2m-1)^-1 ... C_2^-1 D_1^-1: D_1^-1 first
            return self.scale_sign * (-self.log_scale).exp(), self._half_spectra(-1.0, log_dim)
        return self.diagonals().flip(0), self._half_spectra(1.0, log_dim).flip(0)

    def _chain(
        self, x: Tensor, inverse: bool, pre: Tensor | None = None, post: Tensor | None = None
    ) -> Tensor:
        if torch.is_grad_enabled():
            scales, spectra = self._chain_factors(inverse)
        else:
            name = "inverse_factors" if inverse else "forward_factors"
            scales, spectra = self._memo(name, lambda: self._chain_factors(inverse))
        return _CirculantDiagonalChain.apply(x, pre, post, scales, spectra)

    # --------------------------------------------------------------- hooks
    def _matvec(self, x: Tensor) -> Tensor:
        return self._chain(x, inverse=False)

    def _solve(self, y: Tensor) -> Tensor:
        return self._chain(y, inverse=True)

    def _log_abs_det(self) -> Tensor:
        return self.log_scale.sum() + (self.log_magnitude * self.bin_multiplicity).sum()

    def _dense(self) -> Tensor:
        return self._dense_sides([self], inverse=False)[0][0]  # one layer: one matrix

    # Small D: a flow runs the layer as its dense matrix (see DenseSide): a
    # few ops on the parameters of all its circulant layers at once and one
    # GEMM each, against a chain of FFTs per layer.
    def _use_dense_matrix(self) -> bool:
        return self.input_dim <= _DENSE_MAX

    def _dense_group(self) -> tuple:
        return (self.input_dim, self.num_factors)

    @classmethod
    def _dense_sides(
        cls, layers: list[CirculantDiagonalLinear], inverse: bool
    ) -> tuple[Sequence[Tensor], Tensor]:
        """Each layer's dense :math:`W` (or :math:`W^{-1}`) and the sum of their log-dets.

        Cost :math:`O(K m D^3)` (:math:`O(K D^2)` for m = 2), in about 20 ops whatever K.
        """
        dim = layers[0].input_dim
        log_scale = stack_params([layer.log_scale for layer in layers])
        log_magnitude = stack_params([layer.log_magnitude for layer in layers])
        power = -1.0 if inverse else 1.0
        scale_sign = stack_params([layer.scale_sign for layer in layers])
        diagonals = scale_sign * (power * log_scale).exp()  # ([K,] m, D)
        spectra = _half_spectra(
            stack_params([layer.phase for layer in layers]),
            log_magnitude,
            stack_params([layer.spectrum_sign for layer in layers]),
            power,
            0.0,
        )
        vectors = torch.fft.irfft(spectra, n=dim)  # ([K,] m - 1, D)
        ar = torch.arange(dim, device=vectors.device)
        circulants = vectors[..., (ar[:, None] - ar) % dim]  # circ(c)[i, l] = c[(i - l) mod D]
        # W = D_1 C_2 D_3 ... D_(2m-1); W^-1 = D_(2m-1)^-1 ... C_2^-1 D_1^-1
        m = diagonals.shape[-2]
        order = range(m - 1, 0, -1) if inverse else range(1, m)
        weight = diagonals[..., m - 1 if inverse else 0, :].unsqueeze(-1)  # a row scaling
        for j in order:
            circulant = circulants[..., j - 1, :, :]
            weight = weight * circulant if weight.shape[-1] == 1 else weight @ circulant
            weight = weight * diagonals[..., j - 1 if inverse else j, :].unsqueeze(-2)
        log_det = log_scale.sum() + (log_magnitude * _bin_multiplicity(dim, log_magnitude)).sum()
        return (weight.unbind(0) if log_scale.dim() > 2 else [weight]), log_det

    # ----------------------------------------------------------- transform
    # The bias is fused into the chain: W x + b adds it in the last diagonal's
    # pass, W^-1 (y - b) subtracts it in the first one.
    def _affine_rows(self, x: Tensor) -> Tensor:
        if self._use_dense_matrix():
            return self._dense_rows(x, inverse=False)
        return self._chain(x, False, post=self.bias)

    def _inverse_affine_rows(self, y: Tensor) -> Tensor:
        if self._use_dense_matrix():
            return self._dense_rows(y, inverse=True)
        return self._chain(y, True, pre=None if self.bias is None else -self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_factors={self.num_factors}"


def circulant_diagonal_linear(input_dim: int, **kwargs) -> CirculantDiagonalLinear:
    """A :class:`CirculantDiagonalLinear` of dimension ``input_dim``; keywords as for the class."""
    return CirculantDiagonalLinear(input_dim, **kwargs)


register_family("circulant", circulant_diagonal_linear, directional=False, maintenance=False)
