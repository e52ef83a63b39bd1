"""A dense network whose weights and biases live in one parameter tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pyro.distributions.transforms import AffineCoupling
from torch import Tensor

from ._fused import soft_bound

__all__ = ["PackedDenseNN", "packed_affine_coupling"]


class PackedDenseNN(torch.nn.Module):
    r"""Pyro's :class:`~pyro.nn.DenseNN` (the same map, initialization and outputs), with
    every layer's weight and bias a view of one parameter, ``flat``.

    Why: Pyro's SVI pays per parameter *tensor*, not per number: each step
    registers every tensor with ``pyro.param`` and runs a separate optimizer
    on it (about 45 microseconds a tensor together on the project's machine).
    A coupling network of three layers holds six tensors; packed, one. At the
    sizes of SVI guides that overhead is a large part of a step.

    :param int input_dim: inputs.
    :param hidden_dims: widths of the hidden layers.
    :param param_dims: the outputs, split as Pyro's ``DenseNN`` splits them
        (a tuple for two or more, one tensor for one).
    :param nonlinearity: the hidden layers' activation (default ReLU).
    :param log_scale_bounds: ``(a, b)``, ``a < 0 < b``, or ``None``: for a coupling's
        network with two outputs ``(shift, log-scale)``, the log-scale softly bounded to
        ``(a, b)`` (:func:`~pyro_lunet.transforms._fused.soft_bound`).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        param_dims: Sequence[int] = (1, 1),
        nonlinearity: torch.nn.Module | None = None,
        log_scale_bounds: tuple[float, float] | None = None,
    ):
        super().__init__()
        if log_scale_bounds is not None:
            low, high = (float(b) for b in log_scale_bounds)
            if not (len(param_dims) == 2 and low < 0 < high):
                raise ValueError(
                    "log_scale_bounds needs two outputs (shift, log-scale) and bounds a < 0 < b, "
                    f"got param_dims={list(param_dims)}, log_scale_bounds={log_scale_bounds!r}"
                )
            log_scale_bounds = (low, high)
        self.log_scale_bounds = log_scale_bounds
        sizes = [input_dim, *hidden_dims, sum(param_dims)]
        self.shapes = [(out, inp) for inp, out in zip(sizes[:-1], sizes[1:])]
        self.param_dims = list(param_dims)
        self.f = torch.nn.ReLU() if nonlinearity is None else nonlinearity
        # torch.nn.Linear's own initialization, layer by layer, as DenseNN has it.
        layers = [torch.nn.Linear(inp, out) for out, inp in self.shapes]
        self.flat = torch.nn.Parameter(
            torch.cat(
                [t.detach().reshape(-1) for layer in layers for t in (layer.weight, layer.bias)]
            )
        )

    def zero_output_(self) -> PackedDenseNN:
        """Zeroes the last layer's weight and bias (a coupling then starts as the identity)."""
        out, inp = self.shapes[-1]
        with torch.no_grad():
            self.flat[-(out * inp + out) :].zero_()
        return self

    # A state dict of Pyro's DenseNN (``layers.0.weight``, ...), e.g. a checkpoint
    # from before the couplings were packed, loads into ``flat``.
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        keys = [f"{prefix}layers.{k}.{name}" for k in range(len(self.shapes))
                for name in ("weight", "bias")]  # fmt: skip
        if prefix + "flat" not in state_dict and all(key in state_dict for key in keys):
            state_dict[prefix + "flat"] = torch.cat([state_dict.pop(k).reshape(-1) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def layer_params(self) -> list[Tensor]:
        """``[W_1, b_1, W_2, b_2, ...]``, views of ``flat`` (gradients flow to it)."""
        sizes = [n for out, inp in self.shapes for n in (out * inp, out)]
        parts = self.flat.split(sizes)
        return [
            part.view(self.shapes[k // 2]) if k % 2 == 0 else part for k, part in enumerate(parts)
        ]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        params = self.layer_params()
        h = x
        for k in range(0, len(params), 2):
            h = F.linear(h, params[k], params[k + 1])
            if k + 2 < len(params):
                h = self.f(h)
        if len(self.param_dims) == 1:
            return h
        outputs = h.split(self.param_dims, dim=-1)
        if self.log_scale_bounds is None:
            return tuple(outputs)
        return outputs[0], soft_bound(outputs[1], self.log_scale_bounds)


def packed_affine_coupling(
    input_dim: int, hidden_dims: Sequence[int] | None = None, split_dim: int | None = None,
    **kwargs,
) -> AffineCoupling:  # fmt: skip
    """Pyro's :func:`~pyro.distributions.transforms.affine_coupling` on vectors (the same
    defaults: ``split_dim = D // 2``, one hidden layer of ``10 D``), its network a
    :class:`PackedDenseNN`. Further keywords go to ``AffineCoupling``."""
    split_dim = input_dim // 2 if split_dim is None else split_dim
    hidden_dims = [10 * input_dim] if hidden_dims is None else list(hidden_dims)
    rest = input_dim - split_dim
    return AffineCoupling(split_dim, PackedDenseNN(split_dim, hidden_dims, [rest, rest]), **kwargs)
