"""A fingerprint of tensors' contents, for caches keyed on parameters.

Every in-place change of a tensor (an optimizer step, ``copy_``,
``load_state_dict``, a rank-one merge) bumps its ``_version``; replacing its
storage (``.to()``, ``p.data = ...``) changes its ``data_ptr()``. Two equal
fingerprints therefore mean that no tensor was written through autograd's
view since, with one blind spot: writes through ``p.data`` (Pyro's
``ClippedAdam`` makes them) leave ``_version`` alone, so callers that must
see optimizer steps add :func:`pyro_lunet.transforms.base.optimizer_step_count`
to their key.

This module imports nothing from the package, so every module may use it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

__all__ = ["parameter_fingerprint"]


def parameter_fingerprint(tensors: Iterable[Tensor], requires_grad: bool = False) -> tuple:
    """One ``(version, data_ptr)`` pair per tensor, in the order given.

    :param tensors: the tensors (parameters, buffers) whose changes matter;
        a tensor given twice appears twice.
    :param bool requires_grad: append each tensor's ``requires_grad`` to its
        entry, for keys that must also change when gradients are switched on
        or off.
    :returns: a tuple of ``(version, data_ptr)`` (or ``(version, data_ptr,
        requires_grad)``) tuples, cheap to compare; no host synchronization.
    """
    if requires_grad:
        return tuple((t._version, t.data_ptr(), t.requires_grad) for t in tensors)
    return tuple((t._version, t.data_ptr()) for t in tensors)
