"""Merges and drift corrections of rank-one-updated layers, run from a training loop.

:class:`~pyro_lunet.Maintenance` runs every family's between-steps work;
:class:`RankOneScheduler` is a
:class:`~pyro_lunet.Maintenance` limited to rank-one-updated layers, kept
for the loops written with it.
"""

from __future__ import annotations

from .training import Maintenance
from .transforms.rank_one import RankOneUpdatedLinear

__all__ = ["RankOneScheduler"]


class RankOneScheduler(Maintenance):
    r"""Runs the merges and drift corrections of every
    :class:`~pyro_lunet.RankOneUpdatedLinear` inside a module tree.

    A :class:`~pyro_lunet.Maintenance` that takes only rank-one-updated
    layers into account, with the same keywords and behaviour; its
    :meth:`state_dict` holds the two counters directly.

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

    def layers(self) -> list[RankOneUpdatedLinear]:
        """The rank-one-updated layers in the module tree, each once."""
        return [m for m in super().layers() if isinstance(m, RankOneUpdatedLinear)]

    def state_dict(self) -> dict:
        """The step and round counters, for checkpoints."""
        return self._counters()

    def load_state_dict(self, state: dict) -> None:
        """Restores the counters saved by :meth:`state_dict`."""
        self._load_counters(state)
