"""Runs of small-D steps as one autograd node with a hand-written backward pass.

At small D a step costs its autograd nodes and Python calls, not its flops:
an LU layer's product is about ten nodes (triangles, exponentials, products,
the bias, the log-determinant), a leaky softplus with its log-derivative
seven, each paying dispatch and autograd overhead on both passes for a few
dozen flops. A :class:`Kernel` is one step's forward and backward as plain
tensor ops; :func:`run_kernels` runs consecutive steps (a whole LU-Net, say)
as a single node, so the overhead is paid once per run rather than once per
op.

Gradients of gradients (``create_graph=True``) do not use the hand-written
backward: it recomputes the run with each kernel's differentiable
:meth:`Kernel.reference` and differentiates that, so every order is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Params = tuple[Tensor | None, ...]


class Kernel:
    """One step ``h -> (out, log_det)`` with its own backward; ``params`` are its tensors.

    ``log_det`` is the step's forward log-determinant: 0-dim when it does not
    depend on the point, else one value per row of ``h`` (``(N, D)`` rows), or
    ``None`` for a step whose log-determinant its caller adds.

    A step may also give its run ``extras`` more 0-dim outputs (a training term
    that its layer reports and a loss may or may not use, e.g. a
    self-normalizing layer's reconstruction term): then :meth:`forward`
    returns them as a fourth element and :meth:`reference` as a third,
    :meth:`backward` gets their gradients as ``grad_extras`` (``None`` where the
    loss did not use one), and :meth:`receive` is handed the run's outputs for them.
    """

    #: How many extra 0-dim outputs the step adds to its run (see above).
    extras = 0

    def forward(self, h: Tensor, params: Params) -> tuple[Tensor, Tensor | None, tuple]:
        """``(out, log_det, saved)``, computed without a graph."""
        raise NotImplementedError

    def backward(
        self, saved: tuple, params: Params, grad_out: Tensor | None, grad_log_det: Tensor | None,
        needs: Sequence[bool],
    ) -> tuple[Tensor | None, list[Tensor | None]]:  # fmt: skip
        """``(grad_h, grads of params)`` from the output's and the log-det's gradients.

        ``grad_log_det`` is shaped like the step's ``log_det`` (summed over
        the rows for a 0-dim one); ``needs`` says which params need a gradient.
        """
        raise NotImplementedError

    def reference(self, h: Tensor, params: Params) -> tuple[Tensor, Tensor | None]:
        """The same ``(out, log_det)`` by differentiable ops (for gradients of gradients)."""
        raise NotImplementedError

    def receive(self, extras: tuple[Tensor, ...]) -> None:
        """The run's outputs for this step's extras (autograd-connected), after the forward."""


#: Below this D the families hand a flow their kernels; from it on one step's GEMMs
#: dominate and the families' own (blocked, memoized) paths are as fast.
KERNEL_MAX_DIM = 256

# ------------------------------------------------------------------- LU
_MASKS: dict[tuple[int, torch.device], Tensor] = {}


def _strict_lower_mask(like: Tensor) -> Tensor:
    """A boolean ``(D, D)`` mask of the entries below the diagonal, on ``like``'s device."""
    key = (like.shape[0], like.device)
    mask = _MASKS.get(key)
    if mask is None:
        mask = _MASKS[key] = torch.ones(key[0], key[0], dtype=torch.bool, device=key[1]).tril(-1)
    return mask


class LUKernel(Kernel):
    r"""Rows of :math:`(h - s)(LU)^T + a` and :math:`\pm\sum_i d_i`.

    Params ``(packed, sign, bias)``: ``packed`` holds L below its diagonal,
    U above it and :math:`d_i = \log|U_{ii}|` on it, ``sign`` the signs of
    :math:`U_{ii}`; the bias is subtracted first (``subtract=True``, the
    inverse of a density model's layer) or added last. Dense products, for D
    up to a few hundred. Cost :math:`O(D^3 + N D^2)` per pass.
    """

    def __init__(self, subtract: bool, log_det_sign: float):
        self.subtract = subtract
        self.log_det_sign = log_det_sign

    def forward(self, h, params):
        packed, sign, bias = params
        log_diag = packed.diagonal()
        diag = log_diag.exp() * sign
        upper = torch.diagonal_scatter(packed.triu(1), diag)
        strict_lower = packed.tril(-1)
        weight = torch.addmm(upper, strict_lower, upper)  # (I + L') U
        src = h - bias if (self.subtract and bias is not None) else h
        added = bias is not None and not self.subtract
        out = torch.addmm(bias, src, weight.t()) if added else src @ weight.t()
        log_det = log_diag.sum() if self.log_det_sign > 0 else -log_diag.sum()
        return out, log_det, (src, strict_lower, upper, weight, diag)

    def backward(self, saved, params, grad_out, grad_log_det, needs):
        src, strict_lower, upper, weight, diag = saved
        packed, _, bias = params
        grad_h = grad_packed = grad_bias = None
        if grad_out is not None:
            grad_src = grad_out @ weight
            grad_h = grad_src
            if needs[0]:
                grad_weight = torch.mm(grad_out.t(), src)
                # W = (I + L') U: dL' = dW U^T below the diagonal, dU = dW + L'^T dW on and above
                grad_lower = torch.mm(grad_weight, upper.t())
                grad_upper = torch.addmm(grad_weight, strict_lower.t(), grad_weight)
                grad_packed = torch.where(_strict_lower_mask(packed), grad_lower, grad_upper)
                grad_packed.diagonal().mul_(diag)  # d U_ii / d d_i = U_ii
            if needs[2]:
                grad_bias = -grad_src.sum(0) if self.subtract else grad_out.sum(0)
        if grad_log_det is not None and needs[0]:
            if grad_log_det.dim():  # the run's log-det is per row: this step's is their sum's part
                grad_log_det = grad_log_det.sum()
            if grad_packed is None:
                grad_packed = torch.zeros_like(packed)
            grad_packed.diagonal().add_(grad_log_det if self.log_det_sign > 0 else -grad_log_det)
        return grad_h, [grad_packed, None, grad_bias]

    def reference(self, h, params):
        packed, sign, bias = params
        eye = torch.eye(packed.shape[0], dtype=packed.dtype, device=packed.device)
        lower = packed.tril(-1) + eye
        upper = packed.triu(1) + torch.diag(sign * packed.diagonal().exp())
        src = h - bias if (self.subtract and bias is not None) else h
        out = src @ (lower @ upper).T
        if bias is not None and not self.subtract:
            out = out + bias
        return out, self.log_det_sign * packed.diagonal().sum()


# ---------------------------------------------------------- leaky softplus
def log_leaky_softplus_slope(h: Tensor, alpha: float) -> Tensor:
    """:math:`\\log\\phi'(h) = \\log(\\alpha + (1 - \\alpha)\\sigma(h))`: the slope lies in
    :math:`(\\alpha, 1)`, so its log is stable for every ``h``."""
    return (torch.sigmoid(h) * (1.0 - alpha) + alpha).log()


def leaky_softplus(h: Tensor, alpha: float) -> Tensor:
    """:math:`\\alpha h + (1 - \\alpha)\\,\\mathrm{softplus}(h)`, rounded as every caller rounds it.

    (``h + (1 - alpha) softplus(-h)`` is the same number in exact arithmetic but
    cancels for large negative ``h``, and a Newton inverse of one form does not
    round-trip the other to float precision.) One ``lerp`` from ``h`` towards
    ``softplus(h)``: exact at both ends, and two ops where the sum takes three.
    """
    return torch.lerp(h, F.softplus(h), 1.0 - alpha)


class LeakySoftplusKernel(Kernel):
    r""":math:`\phi(u) = \alpha u + (1 - \alpha)\,\mathrm{softplus}(u)` and
    :math:`\pm\sum_j \log\phi'(u_j)` (the sign ``-`` for a layer that is
    :math:`\phi^{-1}` run backwards).

    With :math:`s = \sigma(u)`: :math:`\phi' = \alpha + (1 - \alpha) s \in
    (\alpha, 1)`, so its log is stable, and :math:`(\log\phi')' = (1 -
    \alpha) s (1 - s) / \phi'`. No params. Cost O(N D).
    """

    def __init__(self, alpha: float, log_det_sign: float):
        self.alpha = alpha
        self.log_det_sign = log_det_sign

    def forward(self, h, params):
        s = torch.sigmoid(h)
        slope = s.mul(1.0 - self.alpha).add_(self.alpha)
        out = leaky_softplus(h, self.alpha)
        log_det = slope.log().sum(-1)
        if self.log_det_sign < 0:
            log_det = -log_det
        return out, log_det, (s, slope)

    def backward(self, saved, params, grad_out, grad_log_det, needs):
        s, slope = saved
        grad = None if grad_out is None else grad_out * slope
        if grad_log_det is not None:
            # (log phi')' = (1 - alpha) s (1 - s) / phi'
            curvature = s.mul(1.0 - s).div_(slope)
            weight = (1.0 - self.alpha) * self.log_det_sign
            if grad is None:
                grad = curvature.mul_(grad_log_det.unsqueeze(-1)).mul_(weight)
            else:
                grad = grad.addcmul_(curvature, grad_log_det.unsqueeze(-1), value=weight)
        return grad, []

    def reference(self, h, params):
        out = leaky_softplus(h, self.alpha)
        return out, self.log_det_sign * log_leaky_softplus_slope(h, self.alpha).sum(-1)


# -------------------------------------------------------------- rank one
class RankOneKernel(Kernel):
    r"""Rows of :math:`x (A + u v^\top)^\top + b` and
    :math:`\log|\det A| + \log|1 + v^\top A^{-1} u|`.

    Params ``(A, A_inv, log_abs_det_A, u, v, bias)``; the first three are
    frozen buffers. Cost :math:`O(N D^2)` for the product, :math:`O(D^2)` for
    the log-determinant.
    """

    def forward(self, h, params):
        a, a_inv, log_abs_det_a, u, v, bias = params
        projection = h @ v
        out = h @ a.t() if bias is None else torch.addmm(bias, h, a.t())
        out.addr_(projection, u)
        w = a_inv @ u
        delta = torch.dot(v, w) + 1.0
        return out, log_abs_det_a + delta.abs().log(), (h, projection, w, delta)

    def backward(self, saved, params, grad_out, grad_log_det, needs):
        h, projection, w, delta = saved
        a, a_inv, _, u, v, bias = params
        grad_h = grad_u = grad_v = grad_bias = None
        if grad_out is not None:
            along_u = grad_out @ u
            grad_h = torch.addr(grad_out @ a, along_u, v)
            grad_u = grad_out.t() @ projection if needs[3] else None
            grad_v = h.t() @ along_u if needs[4] else None
            grad_bias = grad_out.sum(0) if needs[5] else None
        if grad_log_det is not None:
            g = (grad_log_det.sum() if grad_log_det.dim() else grad_log_det) / delta
            if needs[3]:  # d log|delta| / du = A^-T v / delta
                term = (a_inv.t() @ v) * g
                grad_u = term if grad_u is None else grad_u + term
            if needs[4]:  # d log|delta| / dv = A^-1 u / delta
                grad_v = w * g if grad_v is None else grad_v + w * g
        return grad_h, [None, None, None, grad_u, grad_v, grad_bias]

    def reference(self, h, params):
        a, a_inv, log_abs_det_a, u, v, bias = params
        out = h @ (a + torch.outer(u, v)).t()
        if bias is not None:
            out = out + bias
        return out, log_abs_det_a + (1.0 + v @ (a_inv @ u)).abs().log()


# -------------------------------------------------------- affine coupling
def soft_bound(raw: Tensor, bounds: tuple[float, float]) -> Tensor:
    r""":math:`b \tanh(r / b)` for :math:`r > 0`, :math:`a \tanh(r / a)` below: values in
    :math:`(a, b)` for ``bounds`` :math:`(a, b)`, :math:`a < 0 < b`, slope 1 at 0 (a
    zero-initialized coupling still starts as the identity) and a gradient that fades
    where the bound saturates (a hard clip's passes through and lets a network grow)."""
    return _soft_bound_and_slope(raw, bounds)[0]


def _soft_bound_and_slope(raw: Tensor, bounds: tuple[float, float]) -> tuple[Tensor, Tensor]:
    low, high = bounds
    if low == -high:  # tanh is odd: one width serves both sides
        t = torch.tanh(raw / high)
        return high * t, 1.0 - t * t
    width = torch.where(raw > 0, raw.new_tensor(high), raw.new_tensor(low))
    t = torch.tanh(raw / width)
    return width * t, 1.0 - t * t


class AffineCouplingKernel(Kernel):
    r"""Pyro's :class:`~pyro.distributions.transforms.AffineCoupling` with a ReLU ``DenseNN``.

    .. math::

        y_{1:d} = x_{1:d}, \qquad y_{d+1:D} = e^{s} \odot x_{d+1:D} + m,
        \qquad (m, s) = \mathrm{MLP}(x_{1:d}),

    :math:`s` clamped to ``[lo, hi]`` with the gradient of the identity (as
    Pyro does), :math:`\log|\det J| = \sum s`. With ``bounds`` :math:`(a, b)`
    the network's raw output :math:`r` is first softly bounded,
    :math:`s = \beta \tanh(r / \beta)` with :math:`\beta = b` for :math:`r > 0`,
    :math:`a` below (see :func:`soft_bound`). Params: the network's
    weights and biases, in order, or with ``shapes`` (the layers' weight
    shapes) one flat tensor holding them all, split inside the node (no
    autograd views to build and undo per step). ``inverse`` computes
    :math:`x` from :math:`y`. Cost: the network's, O(N D) besides.
    """

    def __init__(
        self, split: int, clip: tuple[float, float], inverse: bool,
        bounds: tuple[float, float] | None = None,
        shapes: Sequence[tuple[int, int]] | None = None,
    ):  # fmt: skip
        self.split, self.clip, self.inverse, self.bounds = split, clip, inverse, bounds
        self.shapes = shapes
        if shapes is not None:
            self.sizes = [n for out, inp in shapes for n in (out * inp, out)]

    def _layers(self, params) -> Sequence[Tensor]:
        if self.shapes is None:
            return params
        parts = params[0].split(self.sizes)
        return [p.view(self.shapes[k // 2]) if k % 2 == 0 else p for k, p in enumerate(parts)]

    def forward(self, h, params):
        params = self._layers(params)
        first, second = h[:, : self.split], h[:, self.split :]
        z, hidden = first, []  # hidden: each ReLU's output, the next layer's input
        for i in range(0, len(params), 2):
            z = torch.addmm(params[i + 1], z, params[i].t())
            if i + 2 < len(params):
                z = torch.relu_(z)
                hidden.append(z)
        mean, log_scale = z.split(second.shape[1], dim=1)
        slope = None  # d s / d r of the soft bound
        if self.bounds is not None:
            log_scale, slope = _soft_bound_and_slope(log_scale, self.bounds)
        log_scale = log_scale.clamp(*self.clip)
        if self.inverse:
            rest = (second - mean) * torch.exp(-log_scale)
            keep = (first, hidden, rest, torch.exp(-log_scale), slope)
        else:
            scale = torch.exp(log_scale)
            rest = torch.addcmul(mean, scale, second)
            keep = (first, hidden, second, scale, slope)
        return torch.cat((first, rest), dim=1), log_scale.sum(1), keep

    def backward(self, saved, params, grad_out, grad_log_det, needs):
        first, hidden, other, factor, slope = saved
        width = other.shape[1]
        packed = self.shapes is not None
        if packed:
            params, needs = self._layers(params), [needs[0]] * len(self.sizes)
        if grad_out is None:
            grad_first = None
            grad_mean = other.new_zeros(other.shape)
            grad_log_scale = grad_log_det.unsqueeze(1).expand_as(other)
            grad_second = None
        else:
            grad_first, grad_rest = grad_out[:, : self.split], grad_out[:, self.split :]
            if self.inverse:  # x2 = (y2 - m) e^-s, saved: other = x2, factor = e^-s
                grad_second = grad_rest * factor
                grad_mean = -grad_second
                grad_log_scale = -grad_rest * other
            else:  # y2 = e^s x2 + m, saved: other = x2, factor = e^s
                grad_second = grad_rest * factor
                grad_mean = grad_rest
                grad_log_scale = grad_rest * other * factor
            if grad_log_det is not None:
                grad_log_scale = grad_log_scale + grad_log_det.unsqueeze(1)
        if slope is not None:
            grad_log_scale = grad_log_scale * slope
        grad_z = torch.cat((grad_mean, grad_log_scale), dim=1)
        grads: list[Tensor | None] = [None] * len(params)
        for i in reversed(range(0, len(params), 2)):
            inputs = hidden[i // 2 - 1] if i else first
            if needs[i]:
                grads[i] = torch.mm(grad_z.t(), inputs)
            if needs[i + 1]:
                grads[i + 1] = grad_z.sum(0)
            grad_z = grad_z @ params[i]
            if i:  # through the ReLU that made this layer's input
                grad_z = torch.ops.aten.threshold_backward(grad_z, inputs, 0.0)
        grad_first = grad_z if grad_first is None else grad_first + grad_z
        if grad_second is None:
            grad_second = grad_first.new_zeros(first.shape[0], width)
        if packed:
            grads = [torch.cat([g.reshape(-1) for g in grads])] if needs[0] else [None]
        return torch.cat((grad_first, grad_second), dim=1), grads

    def reference(self, h, params):
        params = self._layers(params)
        first, second = h[:, : self.split], h[:, self.split :]
        z = first
        for i in range(0, len(params), 2):
            z = torch.nn.functional.linear(z, params[i], params[i + 1])
            if i + 2 < len(params):
                z = torch.relu(z)
        mean, raw = z.split(second.shape[1], dim=1)
        if self.bounds is not None:
            raw = soft_bound(raw, self.bounds)
        log_scale = raw + (raw.clamp(*self.clip) - raw).detach()
        if self.inverse:
            rest = (second - mean) * torch.exp(-log_scale)
        else:
            rest = torch.exp(log_scale) * second + mean
        return torch.cat((first, rest), dim=1), log_scale.sum(1)


def affine_coupling_kernel(part, inverse: bool) -> tuple[Kernel, tuple] | None:
    """The kernel of a Pyro ``AffineCoupling`` on vectors with a plain ReLU ``DenseNN`` (or
    :class:`~pyro_lunet.transforms.packed_nn.PackedDenseNN`), or None."""
    from pyro.nn import DenseNN

    from .packed_nn import PackedDenseNN

    net = getattr(part, "nn", None)
    if (
        torch.is_grad_enabled()
        and type(net) is PackedDenseNN
        and part.dim == -1
        and type(net.f) is torch.nn.ReLU
        and len(net.param_dims) == 2
        and net.param_dims[0] == net.param_dims[1]
    ):
        clip = (part.log_scale_min_clip, part.log_scale_max_clip)
        kernel = AffineCouplingKernel(part.split_dim, clip, inverse, net.log_scale_bounds,
                                      net.shapes)  # fmt: skip
        return kernel, (net.flat,)
    if (
        not torch.is_grad_enabled()
        or type(net) is not DenseNN
        or part.dim != -1
        or type(net.f) is not torch.nn.ReLU
        or len(net.param_dims) != 2
        or net.param_dims[0] != net.param_dims[1]
        or not all(
            type(layer) is torch.nn.Linear and layer.bias is not None for layer in net.layers
        )
    ):
        return None
    params = tuple(t for layer in net.layers for t in (layer.weight, layer.bias))
    clip = (part.log_scale_min_clip, part.log_scale_max_clip)
    return AffineCouplingKernel(part.split_dim, clip, inverse), params


# ------------------------------------------------------- Pyro's affine maps
class ElementwiseAffineKernel(Kernel):
    r"""Pyro's :class:`~pyro.distributions.transforms.AffineTransform` on vectors:
    rows of :math:`h \odot s + m` (``inverse``: :math:`(h - m) / s`) and
    :math:`\sum_i \log|s_i|` (the forward map's, as every kernel's). Params ``(m, s)``,
    both ``(D,)``. Cost O(N D)."""

    def __init__(self, inverse: bool):
        self.inverse = inverse

    def forward(self, h, params):
        loc, scale = params
        log_det = scale.abs().log().sum()
        if self.inverse:
            out = (h - loc) / scale
            return out, log_det, (out,)
        return torch.addcmul(loc, h, scale), log_det, (h,)

    def backward(self, saved, params, grad_out, grad_log_det, needs):
        (x,) = saved  # the step's vector-side rows: the input forward, the output inverse
        loc, scale = params
        grad_h = grad_loc = grad_scale = None
        if grad_out is not None:
            grad_h = grad_out / scale if self.inverse else grad_out * scale
            if needs[0]:
                grad_loc = -grad_h.sum(0) if self.inverse else grad_out.sum(0)
            if needs[1]:  # d/ds of h s + m is h; of (h - m)/s is -x/s
                grad_scale = -(grad_h * x).sum(0) if self.inverse else (grad_out * x).sum(0)
        if grad_log_det is not None and needs[1]:
            if grad_log_det.dim():
                grad_log_det = grad_log_det.sum()
            step = grad_log_det / scale
            grad_scale = step if grad_scale is None else grad_scale + step
        return grad_h, [grad_loc, grad_scale]

    def reference(self, h, params):
        loc, scale = params
        log_det = scale.abs().log().sum()
        return ((h - loc) / scale if self.inverse else h * scale + loc), log_det


class TriangularAffineKernel(Kernel):
    r"""Pyro's :class:`~pyro.distributions.transforms.LowerCholeskyAffine`: rows of
    :math:`h L^\top + m` and :math:`\sum_i \log L_{ii}`; ``inverse``: rows of
    :math:`L^{-1}(h - m)` (a triangular solve, reading the lower triangle as Pyro's
    does). Params ``(L, m)``. Cost :math:`O(N D^2)`."""

    def __init__(self, inverse: bool):
        self.inverse = inverse

    def forward(self, h, params):
        tril, loc = params
        log_det = tril.diagonal().log().sum()
        if self.inverse:
            out = torch.linalg.solve_triangular(tril, (h - loc).t(), upper=False).t()
            return out, log_det, (out,)
        return torch.addmm(loc, h, tril.t()), log_det, (h,)

    def backward(self, saved, params, grad_out, grad_log_det, needs):
        (x,) = saved  # the vector-side rows: the input forward, the output inverse
        tril, _ = params
        grad_h = grad_tril = grad_loc = None
        if grad_out is not None:
            if self.inverse:  # x = L^-1 (h - m): dh = L^-T dx, dL = -tril(dh x^T)
                grad_h = torch.linalg.solve_triangular(tril.t(), grad_out.t(), upper=True).t()
                if needs[0]:
                    grad_tril = torch.mm(grad_h.t(), x).neg_().tril_()
                if needs[1]:
                    grad_loc = -grad_h.sum(0)
            else:
                grad_h = grad_out @ tril
                if needs[0]:
                    grad_tril = torch.mm(grad_out.t(), x)
                if needs[1]:
                    grad_loc = grad_out.sum(0)
        if grad_log_det is not None and needs[0]:
            if grad_log_det.dim():
                grad_log_det = grad_log_det.sum()
            if grad_tril is None:
                grad_tril = torch.zeros_like(tril)
            grad_tril.diagonal().add_(grad_log_det / tril.diagonal())
        return grad_h, [grad_tril, grad_loc]

    def reference(self, h, params):
        tril, loc = params
        log_det = tril.diagonal().log().sum()
        if self.inverse:
            out = torch.linalg.solve_triangular(tril, (h - loc).t(), upper=False).t()
            return out, log_det
        return h @ tril.t() + loc, log_det


def affine_transform_kernel(part, inverse: bool) -> tuple[Kernel, tuple] | None:
    """The kernel of a Pyro ``AffineTransform`` on vectors (``event_dim=1``, loc and scale
    tensors of shape ``(D,)``), or None (scalars, broadcasting shapes: Pyro's own path)."""
    loc, scale = part.loc, part.scale
    vectors = isinstance(loc, Tensor) and isinstance(scale, Tensor) and scale.dim() == 1
    if not (torch.is_grad_enabled() and part.event_dim == 1 and vectors):
        return None
    return (ElementwiseAffineKernel(inverse), (loc, scale)) if loc.shape == scale.shape else None


def lower_cholesky_affine_kernel(part, inverse: bool) -> tuple[Kernel, tuple] | None:
    """The kernel of a Pyro ``LowerCholeskyAffine`` with a ``(D, D)`` factor, or None."""
    tril, loc = part.scale_tril, part.loc
    if not torch.is_grad_enabled() or tril.dim() != 2 or loc.dim() != 1:
        return None
    return TriangularAffineKernel(inverse), (tril, loc)


# ------------------------------------------------------- dense sides
class DenseKernel(Kernel):
    r"""Rows of :math:`h M^\top + b`, or :math:`(h - b) M^\top` with ``subtract``.

    Params ``(M, bias)``: ``M`` is a layer's matrix for the direction run
    (:math:`W` or :math:`W^{-1}`), assembled beforehand from its parameters
    (:class:`DenseSide`). The log-determinant is the layer's constant, added
    by the caller, so this step has none. Cost :math:`O(N D^2)`.
    """

    def __init__(self, subtract: bool):
        self.subtract = subtract

    def forward(self, h, params):
        matrix, bias = params
        if bias is None:
            return h @ matrix.t(), None, (h,)
        if self.subtract:
            src = h - bias
            return src @ matrix.t(), None, (src,)
        return torch.addmm(bias, h, matrix.t()), None, (h,)

    def backward(self, saved, params, grad_out, grad_log_det, needs):
        (src,) = saved
        matrix, bias = params
        if grad_out is None:
            return None, [None, None]
        grad_src = grad_out @ matrix
        grad_matrix = torch.mm(grad_out.t(), src) if needs[0] else None
        grad_bias = None
        if needs[1]:
            grad_bias = -grad_src.sum(0) if self.subtract else grad_out.sum(0)
        return grad_src, [grad_matrix, grad_bias]

    def reference(self, h, params):
        matrix, bias = params
        if bias is not None and self.subtract:
            h = h - bias
        out = h @ matrix.t()
        return (out + bias if bias is not None and not self.subtract else out), None


class DenseSide:
    """A layer's request to run as a :class:`DenseKernel`: its matrix for one direction.

    The matrices of all the layers of one kind in a run are assembled
    together (:func:`assemble_dense_sides`): at small D a layer's matrix
    costs a handful of ops on its parameters whatever their number, so one
    batched assembly for a flow's K layers costs what one layer's did.

    The layer's class provides ``_dense_sides(layers, inverse) -> (matrices, log_det)``:
    the K ``(D, D)`` matrices of the direction and the sum of the K forward
    log-determinants, differentiable; layers of one ``_dense_group()`` key
    are assembled together.
    """

    __slots__ = ("layer", "inverse")

    def __init__(self, layer, inverse: bool):
        self.layer, self.inverse = layer, inverse

    def kernel(self) -> tuple[Kernel, DenseSide]:
        """The step a layer's ``_kernel`` hook returns: a dense kernel awaiting its matrix."""
        return DenseKernel(subtract=self.inverse), self


def assemble_dense_sides(steps: Sequence) -> tuple[list, Tensor | None]:
    """``steps`` with every :class:`DenseSide` replaced by its assembled ``(M, bias)`` params,
    and the sum of those layers' forward log-determinants (``None`` if there were none).

    ``None`` entries (steps that are not kernels) are passed through.
    """
    groups: dict[tuple, list[int]] = {}
    for i, step in enumerate(steps):
        if step is not None and isinstance(step[1], DenseSide):
            layer = step[1].layer
            groups.setdefault((type(layer), layer._dense_group()), []).append(i)
    if not groups:
        return list(steps), None
    steps, total = list(steps), None
    for (cls, _), indices in groups.items():
        sides = [steps[i][1] for i in indices]
        matrices, log_det = cls._dense_sides([s.layer for s in sides], sides[0].inverse)
        for i, side, matrix in zip(indices, sides, matrices):
            steps[i] = (steps[i][0], (matrix, side.layer.bias))
        total = log_det if total is None else total + log_det
    return steps, total


def stack_params(tensors: Sequence[Tensor]) -> Tensor:
    """The layers' tensors stacked on a new first dim; a single layer's tensor as it is (a
    family's assembly handles both: at small D an op saved is time saved)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tuple(tensors))


# ------------------------------------------------------------------- runs
def run_kernels(steps: Sequence[tuple[Kernel, Params]], h: Tensor) -> tuple[Tensor, Tensor]:
    """``h`` through every ``(kernel, params)`` in turn, as one autograd node.

    ``h`` is ``(N, D)``; returns the output rows and the summed log-det
    (0-dim if every step's is, else ``(N,)``). Steps whose params are a
    :class:`DenseSide` are assembled first (:func:`assemble_dense_sides`).
    """
    steps, assembled = assemble_dense_sides(steps)
    out, log_det = run_assembled(steps, h)
    if log_det is None:
        return out, h.new_zeros(()) if assembled is None else assembled
    return out, log_det if assembled is None else log_det + assembled


def run_assembled(
    steps: Sequence[tuple[Kernel, Params]], h: Tensor
) -> tuple[Tensor, Tensor | None]:
    """:func:`run_kernels` for steps whose dense sides are assembled; the log-det is
    ``None`` when no step has one of its own."""
    kernels = [kernel for kernel, _ in steps]
    sizes = [len(params) for _, params in steps]
    flat = [p for _, params in steps for p in params]
    out, log_det, *extras = _KernelRun.apply(kernels, sizes, h, *flat)
    if extras:  # each step that has some gets its own outputs back
        start = 0
        for kernel in kernels:
            if kernel.extras:
                kernel.receive(tuple(extras[start : start + kernel.extras]))
                start += kernel.extras
    return out, log_det


def _split(flat: Sequence, sizes: Sequence[int]) -> list:
    out, start = [], 0
    for size in sizes:
        out.append(tuple(flat[start : start + size]))
        start += size
    return out


def _add(total: Tensor | None, log_det: Tensor | None) -> Tensor | None:
    if log_det is None:
        return total
    return log_det if total is None else total + log_det


def _reference_run(kernels, sizes, h, flat):
    total, extras = None, []
    for kernel, params in zip(kernels, _split(flat, sizes)):
        if kernel.extras:
            h, log_det, more = kernel.reference(h, params)
            extras.extend(more)
        else:
            h, log_det = kernel.reference(h, params)
        total = _add(total, log_det)
    return h, total, *extras


def _reference_gradients(kernels, sizes, inputs, needs, grads):
    """Gradients of the run by autograd on the reference ops, with a graph (double backward)."""
    return gradients_with_graph(_reference_run(kernels, sizes, inputs[0], inputs[1:]), grads,
                                inputs, needs)  # fmt: skip


def gradients_with_graph(
    outputs: Sequence[Tensor | None], grads: Sequence[Tensor | None],
    inputs: Sequence[Tensor], needs: Sequence[bool],
) -> list[Tensor | None]:  # fmt: skip
    """The vector-Jacobian product of ``outputs`` (recomputed by differentiable ops) with
    ``grads``, for the ``inputs`` that ``needs`` says, as a graph: what a hand-written
    backward returns when asked for gradients of gradients (``create_graph=True``)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o is not None and g is not None]
    wanted = [t for t, need in zip(inputs, needs) if need]
    got = iter(
        torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs],
            create_graph=True, allow_unused=True,
        )
    )  # fmt: skip
    return [next(got) if need else None for need in needs]


class _KernelRun(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, sizes, h, *flat):
        ctx.set_materialize_grads(False)
        # Inputs are saved version-checked: an in-place update before the
        # backward pass raises instead of giving wrong gradients.
        ctx.save_for_backward(h, *flat)
        saved, total, constant, extras = [], None, [], []
        for kernel, params in zip(kernels, _split(flat, sizes)):
            if kernel.extras:
                h, log_det, keep, more = kernel.forward(h, params)
                extras.extend(more)
            else:
                h, log_det, keep = kernel.forward(h, params)
            saved.append(keep)
            constant.append(log_det is not None and log_det.dim() == 0)
            total = _add(total, log_det)
        ctx.kernels, ctx.sizes, ctx.intermediates = kernels, sizes, saved
        ctx.constant = constant  # which steps' log-dets are 0-dim
        return h, total, *extras  # total is None when no step has a log-det of its own

    @staticmethod
    def backward(ctx, grad_out, grad_log_det, *grad_extras):
        inputs = ctx.saved_tensors
        kernels, sizes = ctx.kernels, ctx.sizes
        needs = ctx.needs_input_grad[2:]
        if torch.is_grad_enabled():  # create_graph=True
            grads = _reference_gradients(
                kernels, sizes, inputs, needs, (grad_out, grad_log_det, *grad_extras)
            )
            return (None, None, *grads)
        params_list = _split(inputs[1:], sizes)
        needs_list = _split(needs[1:], sizes)
        # Before the first step with a parameter that needs a gradient,
        # grad_h is wanted only for the run's input.
        first = next((i for i, n in enumerate(needs_list) if any(n)), len(kernels))
        grads: list = [None] * (len(inputs) - 1)
        offset = len(grads)
        grad_h = grad_out
        # A 0-dim step's log-det gradient is the per-row one's sum: summed once.
        summed = grad_log_det
        if grad_log_det is not None and grad_log_det.dim() and any(ctx.constant):
            summed = grad_log_det.sum()
        extra_end = len(grad_extras)  # the extras' gradients, taken from the last step back
        for i in reversed(range(len(kernels))):
            offset -= sizes[i]
            if i < first and not needs[0]:
                break
            kernel = kernels[i]
            more = {}
            if kernel.extras:
                more["grad_extras"] = grad_extras[extra_end - kernel.extras : extra_end]
                extra_end -= kernel.extras
            elif grad_h is None and grad_log_det is None:
                continue  # no gradient reaches this step (the loss used only extras)
            grad_h, grad_params = kernel.backward(
                ctx.intermediates[i], params_list[i], grad_h,
                summed if ctx.constant[i] else grad_log_det, needs_list[i], **more,
            )  # fmt: skip
            for j, grad in enumerate(grad_params):
                if needs_list[i][j]:
                    grads[offset + j] = grad
        return (None, None, grad_h if needs[0] else None, *grads)
