"""Training-loop helpers shared by every family."""

from __future__ import annotations

import torch

__all__ = ["penalty"]


def penalty(module: torch.nn.Module) -> torch.Tensor:
    """The sum of every layer's training penalty inside ``module``'s tree.

    A layer takes part by defining ``penalty() -> Tensor`` (for instance a
    self-normalizing layer's reconstruction term, or a rank-one-updated
    layer's range penalty). Layers without one contribute nothing, so any
    loop may write ``loss = nll + pyro_lunet.penalty(flow)``.

    :returns: a 0-dim tensor on the module's device and dtype (zero when no
        layer has a penalty).
    """
    total = None
    for sub in module.modules():
        term = getattr(sub, "penalty", None)
        if callable(term):
            value = term()
            total = value if total is None else total + value
    if total is not None:
        return total
    ref = next(iter([*module.parameters(), *module.buffers()]), torch.zeros(()))
    return ref.new_zeros(())
