"""Merges and drift corrections of rank-one-updated layers, run from a training loop."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from pyro.optim import PyroOptim

from .transforms.rank_one import RankOneUpdatedLinear

__all__ = ["RankOneScheduler"]


class RankOneScheduler:
    r"""Runs the merges and drift corrections of every
    :class:`~pyro_lunet.RankOneUpdatedLinear` inside a module tree.

    The layers maintain themselves (see
    :class:`~pyro_lunet.RankOneUpdatedLinear`); a scheduler is the explicit
    control for another cadence: from its first :meth:`step` on, and while it
    lives, its rounds replace the layers' own. Call :meth:`step` once after
    every optimizer step. Every ``merge_every``
    steps it tries to merge each layer (:meth:`~RankOneUpdatedLinear.merge_`),
    forcing every ``force_every``-th round; then it drops the optimizer state
    of each merged layer's :math:`v`, which was just redrawn and whose
    moments belong to the old one (and of :math:`u` too where a non-finite
    update was discarded). Every ``correct_every`` rounds it refreshes each
    :math:`A^{-1}` (:meth:`~RankOneUpdatedLinear.correct_`), and every
    ``recompute_log_det_every`` rounds it also recomputes
    :math:`\log|\det A|` exactly. The layers are looked up at each round, so
    a guide whose transform is built on its first call (e.g.
    ``AutoNormalizingFlow``) may be handed over before that.

    The penalty is not the scheduler's business: add
    :func:`pyro_lunet.penalty` to the loss.

    A plain PyTorch loop::

        flow = dist.TransformedDistribution(base, layers)
        params = torch.nn.ModuleList(layers)
        opt = torch.optim.Adam(params.parameters(), lr=1e-3)
        scheduler = RankOneScheduler(params, opt)
        for x in data:
            opt.zero_grad()
            loss = -flow.log_prob(x).mean() + pyro_lunet.penalty(params)
            loss.backward()
            opt.step()
            scheduler.step()

    Pyro SVI, with the penalty added to the ELBO::

        guide = AutoNormalizingFlow(model, rank_one_updated_linear)
        elbo = Trace_ELBO()

        def loss(model, guide, *args, **kwargs):
            return elbo.differentiable_loss(model, guide, *args, **kwargs) + penalty(guide)

        optim = pyro.optim.Adam({"lr": 1e-2})
        svi = SVI(model, guide, optim, loss=loss)
        scheduler = RankOneScheduler(guide, optim)
        for _ in range(num_steps):
            svi.step()
            scheduler.step()

    Cost: a merge round is O(D^2) per layer and, when there is an optimizer
    to reset, one host synchronization (to learn which layers merged); a
    correction O(D^3) per layer.

    :param module: a ``torch.nn.Module`` (or an iterable of them) holding the
        layers.
    :param optimizer: the ``torch.optim.Optimizer`` or Pyro ``PyroOptim``
        (including its LR schedulers) stepping the layers' parameters, whose
        state for :math:`v` is dropped after a merge; ``None`` to keep all
        optimizer state.
    :param int merge_every: optimizer steps between merge rounds.
    :param force_every: merge rounds between forced ones (a forced merge
        ignores ``log_det_range``), or ``None`` for never.
    :param correct_every: merge rounds between drift corrections, or
        ``None`` for never.
    :param int correct_steps: hyper-power iterations per correction.
    :param recompute_log_det_every: merge rounds between exact
        recomputations of :math:`\log|\det A|` and its sign (``slogdet``,
        O(D^3), cheaper than a correction), or ``None`` for never. The
        stored log-determinant is a running sum of one term per merge, whose
        rounding grows with the number of merges (about 1e-2 after 10,000
        float32 merges at log|det A| = 12, see ``benchmarks/bench_rank_one.py``)
        and biases every ``log_prob``; the default recomputes it with every
        correction.
    """

    def __init__(
        self,
        module: torch.nn.Module | Iterable[torch.nn.Module],
        optimizer: torch.optim.Optimizer | PyroOptim | None = None,
        merge_every: int = 10,
        force_every: int | None = 10,
        correct_every: int | None = 50,
        correct_steps: int = 1,
        recompute_log_det_every: int | None = 50,
    ):
        if isinstance(module, torch.nn.Module):
            self.roots = [module]
        else:
            self.roots = list(module)
            bad = [m for m in self.roots if not isinstance(m, torch.nn.Module)]
            if bad:
                raise ValueError(
                    f"module must be a torch.nn.Module or modules, got {type(bad[0]).__name__}"
                )
        if optimizer is not None and not isinstance(optimizer, (torch.optim.Optimizer, PyroOptim)):
            raise ValueError(
                "optimizer must be a torch.optim.Optimizer, a pyro.optim.PyroOptim or None, "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.merge_every = _positive("merge_every", merge_every)
        self.force_every = _positive("force_every", force_every, optional=True)
        self.correct_every = _positive("correct_every", correct_every, optional=True)
        self.correct_steps = _positive("correct_steps", correct_steps)
        self.recompute_log_det_every = _positive(
            "recompute_log_det_every", recompute_log_det_every, optional=True
        )
        self.num_steps = 0
        self.num_rounds = 0

    def layers(self) -> list[RankOneUpdatedLinear]:
        """The rank-one-updated layers in the module tree, each once."""
        found: dict[int, RankOneUpdatedLinear] = {}
        for module in self.roots:
            for sub in module.modules():
                if isinstance(sub, RankOneUpdatedLinear):
                    found.setdefault(id(sub), sub)
        return list(found.values())

    def step(self) -> None:
        """Counts one optimizer step; merges and corrects when it is time."""
        self.num_steps += 1
        due = self.num_steps % self.merge_every == 0
        if not (due or self.num_steps == 1):
            return
        layers = self.layers()
        for (
            layer
        ) in layers:  # from the first step on, this scheduler's rounds replace the layer's own
            layer._upkeep.scheduler = weakref.ref(self)
        if not due:
            return
        self.num_rounds += 1
        if not layers:
            return
        force = _due(self.force_every, self.num_rounds)
        outcomes = [layer._merge(force) for layer in layers]
        if self.optimizer is not None:
            # One synchronization for the whole tree.
            flags = torch.stack(
                [torch.stack([m, r]).to(outcomes[0][0].device) for m, r in outcomes]
            ).tolist()
            for layer, (merged, reset) in zip(layers, flags):
                if reset:
                    self._forget(layer.v)
                if reset and not merged:  # a discarded non-finite update
                    self._forget(layer.u)
        if _due(self.correct_every, self.num_rounds):
            recompute = _due(self.recompute_log_det_every, self.num_rounds)
            for layer in layers:
                layer.correct_(self.correct_steps, recompute_log_det=recompute)
        elif _due(self.recompute_log_det_every, self.num_rounds):
            for layer in layers:
                layer.correct_(0, recompute_log_det=True)

    def _forget(self, param: torch.Tensor) -> None:
        """Drops the optimizer's state for ``param``: its next step starts afresh."""
        if isinstance(self.optimizer, PyroOptim):
            # One torch optimizer (or LR scheduler around one) per parameter.
            inner = self.optimizer.optim_objs.get(param)
            if inner is None:
                return
            optimizer = getattr(inner, "optimizer", inner)
        else:
            optimizer = self.optimizer
        optimizer.state.pop(param, None)

    def state_dict(self) -> dict:
        """The step and round counters, for checkpoints."""
        return {"num_steps": self.num_steps, "num_rounds": self.num_rounds}

    def load_state_dict(self, state: dict) -> None:
        """Restores the counters saved by :meth:`state_dict`."""
        self.num_steps = int(state["num_steps"])
        self.num_rounds = int(state["num_rounds"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(merge_every={self.merge_every}, "
            f"force_every={self.force_every}, correct_every={self.correct_every}, "
            f"correct_steps={self.correct_steps}, "
            f"recompute_log_det_every={self.recompute_log_det_every})"
        )


def _positive(name: str, value, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def _due(every: int | None, count: int) -> bool:
    return every is not None and count % every == 0
