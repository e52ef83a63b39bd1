"""Training-loop helpers shared by every family.

Every family trains in any loop with no helper: self-normalizing layers apply
their reconstruction gradient in their own backward, rank-one-updated layers
run their own merges and drift corrections from the optimizer steps they take
part in. The helpers here are explicit controls on top, for whatever layers a
module tree holds, so a loop never needs to know which families are inside:

* :func:`penalty`: every layer's penalty in a module tree (to report, or to
  add to a loss for extra weight);
* :class:`Maintenance`: every layer's between-steps work, ``step()`` after
  each optimizer step of a plain PyTorch loop;
* :class:`PenalizedELBO`: an ELBO that adds the penalties of the model and
  guide and runs the maintenance itself, for unmodified ``pyro.infer.SVI``
  with ``pyro.optim`` (or a PyTorch loop through ``elbo(model, guide)``);
* :func:`fit_density`: maximum-likelihood fitting of a flow to data, built
  from named steps that a custom loop may reuse: :func:`train_val_split`
  (the held-out rows) and :func:`train_epoch` (one pass over the batches).

Both kinds of cooperation are discovered by duck typing, never by family:

**Penalties.** A module takes part in :func:`penalty` by defining
``penalty() -> Tensor``.

**Maintenance.** A module takes part in :class:`Maintenance` by defining

* ``maintenance_round(force: bool, correct_steps: int, recompute_log_det:
  bool) -> Iterable[tuple[Tensor, Tensor]]``: one round of its work between
  optimizer steps, which must not change the map it represents. ``force``
  asks it to apply an update it would otherwise refuse (e.g. out of range),
  ``correct_steps`` (0 for none) and ``recompute_log_det`` ask for a drift
  correction. It returns ``(parameter, flag)`` pairs: ``flag``, a 0-dim bool
  tensor on the layer's device, says whether that parameter's optimizer
  state became stale (the scheduler reads all flags in one host
  synchronization, and only when it has an optimizer to reset);
* optionally ``maintenance_claim(scheduler)``: called on a scheduler's first
  step and at each round; a layer that also maintains itself leaves its
  rounds to ``scheduler`` while that object lives.

:class:`~pyro_lunet.RankOneUpdatedLinear` defines both.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import pyro.distributions as dist
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.optim import PyroOptim
from tqdm import tqdm

from . import distributed
from ._scoring import held_out_count, standard_normal
from .distributed import mean_nll  # over the ranks' shares in data-parallel mode
from .fingerprint import parameter_fingerprint
from .transforms.base import optimizer_step_count

__all__ = [
    "FitResult",
    "Maintenance",
    "PenalizedELBO",
    "fit_density",
    "penalty",
    "train_epoch",
    "train_val_split",
]

Modules = torch.nn.Module | Iterable[torch.nn.Module]


def _roots(module: Modules) -> list[torch.nn.Module]:
    roots = [module] if isinstance(module, torch.nn.Module) else list(module)
    bad = [m for m in roots if not isinstance(m, torch.nn.Module)]
    if bad:
        raise ValueError(f"expected a torch.nn.Module or modules, got {type(bad[0]).__name__}")
    return roots


def _unique_modules(roots: list[torch.nn.Module]) -> list[torch.nn.Module]:
    found: dict[int, torch.nn.Module] = {}
    for root in roots:
        for sub in root.modules():
            found.setdefault(id(sub), sub)
    return list(found.values())


def penalty(module: Modules) -> torch.Tensor:
    """The sum of every layer's training penalty inside ``module``'s tree.

    A layer takes part by defining ``penalty() -> Tensor`` (for instance a
    self-normalizing layer's reconstruction term, or a rank-one-updated
    layer's range penalty). Layers without one contribute nothing, so any
    loop may write ``loss = nll + pyro_lunet.penalty(flow)``.

    :param module: a ``torch.nn.Module``, or several (each layer counted once).
    :returns: a 0-dim tensor on the modules' device and dtype (zero when no
        layer has a penalty).
    """
    modules = _unique_modules(_roots(module))
    total = None
    for sub in modules:
        term = getattr(sub, "penalty", None)
        if callable(term):
            value = term()
            total = value if total is None else total + value
    if total is not None:
        return total
    ref = next(
        (t for m in modules for t in m.parameters(recurse=False) if t.is_floating_point()),
        torch.zeros(()),
    )
    return ref.new_zeros(())


def _maintenance_hooks(module: torch.nn.Module) -> tuple[Callable, Callable | None] | None:
    """``(round, claim)`` bound to ``module``, or ``None`` when it needs no maintenance."""
    round_ = getattr(module, "maintenance_round", None)
    if not callable(round_):
        return None
    claim = getattr(module, "maintenance_claim", None)
    return round_, (claim if callable(claim) else None)


class Maintenance:
    r"""Every layer's work between optimizer steps, for a module tree.

    Call :meth:`step` once after every optimizer step. The layers are the
    modules of the tree that define the maintenance hooks (see
    :mod:`pyro_lunet.training`); today these are the rank-one-updated
    layers, whose merges and drift corrections this runs (the other
    families need none: self-normalizing layers only need :func:`penalty`
    in the loss). Layers that also maintain themselves leave their rounds
    to this scheduler from its first :meth:`step` on, while it lives. Layers
    are looked up at each round, so a guide that builds its transform on its
    first call may be handed over before that, and a tree without such
    layers costs nothing.

    Every ``merge_every`` steps a round runs on every layer, forced every
    ``force_every``-th round; then the optimizer state of each parameter a
    layer reports stale (a rank-one layer's freshly redrawn :math:`v`, and
    :math:`u` where a non-finite update was discarded) is dropped. Every
    ``correct_every`` rounds the round includes a drift correction of
    ``correct_steps`` iterations, and every ``recompute_log_det_every``
    rounds an exact recomputation of the log-determinant (O(D^3), cheaper
    than a correction; the default recomputes it with every correction).

    A plain PyTorch loop::

        opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
        maintenance = Maintenance(flow, opt)
        for x in batches:
            loss = -model.log_prob(x).mean() + pyro_lunet.penalty(flow)
            opt.zero_grad()
            loss.backward()
            opt.step()
            maintenance.step()

    Cost: a round is O(D^2) per rank-one layer and, when there is an
    optimizer to reset, one host synchronization for the whole tree; a
    correction O(D^3) per layer.

    :param module: a ``torch.nn.Module`` or several, holding the layers.
    :param optimizer: the ``torch.optim.Optimizer`` or ``pyro.optim.PyroOptim``
        (including its LR schedulers) stepping their parameters, or ``None``
        (optimizer state is then kept across rounds).
    :param int merge_every: optimizer steps between rounds.
    :param force_every: rounds between forced ones, or ``None`` for never.
    :param correct_every: rounds between drift corrections, or ``None`` for
        never.
    :param int correct_steps: iterations per correction.
    :param recompute_log_det_every: rounds between exact recomputations of
        the log-determinant, or ``None`` for never.
    """

    def __init__(
        self,
        module: Modules,
        optimizer: torch.optim.Optimizer | PyroOptim | None = None,
        merge_every: int = 10,
        force_every: int | None = 10,
        correct_every: int | None = 50,
        correct_steps: int = 1,
        recompute_log_det_every: int | None = 50,
    ):
        self.roots = _roots(module)
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

    @property
    def schedulers(self) -> list[Maintenance]:
        """``[self]``: kept for code written when the rounds ran in inner schedulers."""
        return [self]

    def layers(self) -> list[torch.nn.Module]:
        """The modules of the tree that take part, each once."""
        return [m for m in _unique_modules(self.roots) if _maintenance_hooks(m) is not None]

    def step(self) -> None:
        """Counts one optimizer step and does whatever work is due."""
        self.num_steps += 1
        due = self.num_steps % self.merge_every == 0
        if not (due or self.num_steps == 1):
            return
        layers = self.layers()
        hooks = [_maintenance_hooks(layer) for layer in layers]
        for _, claim in hooks:  # from the first step on, these rounds replace the layers' own
            if claim is not None:
                claim(self)
        if not due:
            return
        self.num_rounds += 1
        if not layers:
            return
        force = _due(self.force_every, self.num_rounds)
        correct_steps = self.correct_steps if _due(self.correct_every, self.num_rounds) else 0
        recompute = _due(self.recompute_log_det_every, self.num_rounds)
        stale = [pair for round_, _ in hooks for pair in round_(force, correct_steps, recompute)]
        if self.optimizer is not None and stale:
            # One synchronization for the whole tree.
            device = stale[0][1].device
            flags = torch.stack([flag.to(device) for _, flag in stale]).tolist()
            for (param, _), flag in zip(stale, flags):
                if flag:
                    self._forget(param)

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

    def _counters(self) -> dict:
        return {"num_steps": self.num_steps, "num_rounds": self.num_rounds}

    def _load_counters(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self.num_rounds = int(state["num_rounds"])

    def state_dict(self) -> dict:
        """The step and round counters, for checkpoints."""
        return {"schedulers": [self._counters()]}

    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` saved."""
        for saved in state["schedulers"][:1]:
            self._load_counters(saved)

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


class PenalizedELBO(ELBO):
    r"""An ELBO plus every layer's penalty, with the layers' maintenance run for you.

    Wraps any Pyro ELBO (``Trace_ELBO()`` by default). Its losses are the
    wrapped ELBO's plus :func:`penalty` of the model and the guide (whichever
    are ``torch.nn.Module``\ s, e.g. an ``AutoNormalizingFlow`` guide), so
    self-normalizing layers get their reconstruction term and rank-one-updated
    layers their range penalty. Each gradient-taking call
    (:meth:`loss_and_grads`, :meth:`differentiable_loss`) first runs the
    :class:`Maintenance` of the previous optimizer step when the parameters
    have changed since the last such call: the merges and corrections of
    rank-one-updated layers happen once per optimizer step, and before the
    next gradient, exactly as if run right after the step. (They never
    change the map a layer represents, so one left pending after the last step
    changes nothing.) Nothing else is needed: unmodified ``SVI`` and
    ``pyro.optim``::

        guide = AutoNormalizingFlow(model, partial(coupling_flow, layer="rank_one"))
        optim = pyro.optim.Adam({"lr": 1e-2})
        elbo = PenalizedELBO(Trace_ELBO(num_particles=8, vectorize_particles=True), optim)
        svi = SVI(model, guide, optim, loss=elbo)
        for _ in range(1000):
            svi.step(data)

    or a PyTorch loop through Pyro's ``elbo(model, guide)`` module::

        loss_fn = PenalizedELBO(Trace_ELBO(), optimizer=None)(model, guide)
        loss_fn(data)                      # builds the guide's parameters
        opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
        loss_fn.elbo.set_optimizer(opt)    # so merges reset v's moments
        for _ in range(1000):
            opt.zero_grad()
            loss_fn(data).backward()
            opt.step()

    The penalties are added as the layers define them (their own weights),
    next to an ELBO that sums over the data; :meth:`loss` includes them too,
    ``self.elbo.loss`` is the bare ELBO.

    :param elbo: the wrapped ELBO.
    :param optimizer: the ``PyroOptim`` or ``torch.optim.Optimizer`` stepping
        the parameters, whose state for a redrawn :math:`v` is dropped after a
        merge; ``None`` keeps all optimizer state.
    :param modules: more modules whose layers take part (beyond the model and
        guide).
    :param maintenance: keywords for :class:`Maintenance`.
    """

    def __init__(
        self,
        elbo: ELBO | None = None,
        optimizer: torch.optim.Optimizer | PyroOptim | None = None,
        modules: Iterable[torch.nn.Module] = (),
        **maintenance,
    ):
        if elbo is None:
            elbo = Trace_ELBO()
        if not isinstance(elbo, ELBO):
            raise ValueError(f"elbo must be a pyro.infer.ELBO, got {type(elbo).__name__}")
        # No ELBO.__init__: every ELBO setting is the wrapped one's.
        self.elbo = elbo
        self.optimizer = optimizer
        self.modules = _roots(list(modules))
        self._maintenance_kwargs = maintenance
        Maintenance([], optimizer, **maintenance)  # validates the keywords now
        self.maintenance: Maintenance | None = None
        self._fingerprint: tuple | None = None

    def __getattr__(self, name):
        # ELBO settings (num_particles, max_plate_nesting...) read through.
        if name == "elbo":
            raise AttributeError(name)
        return getattr(self.elbo, name)

    def _get_trace(self, model, guide, args, kwargs):
        return self.elbo._get_trace(model, guide, args, kwargs)

    def set_optimizer(self, optimizer: torch.optim.Optimizer | PyroOptim | None) -> None:
        """Sets the optimizer whose state merges reset (e.g. one built after the guide)."""
        self.optimizer = optimizer
        if self.maintenance is not None:
            self.maintenance.optimizer = optimizer

    def _roots(self, model, guide) -> list[torch.nn.Module]:
        found = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
        return found + self.modules

    def _penalty(self, model, guide) -> torch.Tensor | None:
        roots = self._roots(model, guide)
        return penalty(roots) if roots else None

    def _fingerprint_of(self, roots) -> tuple:
        # The optimizer-step count catches optimizers that write through
        # ``p.data`` (Pyro's ClippedAdam), which leaves ``_version`` alone.
        params = {id(p): p for m in roots for p in m.parameters()}.values()
        return (optimizer_step_count(), *parameter_fingerprint(params))

    def _maintain(self, model, guide) -> None:
        """Runs the maintenance due since the last gradient call, if parameters changed."""
        roots = self._roots(model, guide)
        if not roots:
            return
        if self.maintenance is None:
            self.maintenance = Maintenance(roots, self.optimizer, **self._maintenance_kwargs)
        else:
            self.maintenance.roots = roots
        fingerprint = self._fingerprint_of(roots)
        if self._fingerprint is not None and fingerprint != self._fingerprint:
            self.maintenance.step()

    def _remember(self, model, guide) -> None:
        roots = self._roots(model, guide)
        if roots:
            self._fingerprint = self._fingerprint_of(roots)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The wrapped ELBO's loss plus the penalties, as a float (no gradients, no maintenance)."""
        value = self.elbo.loss(model, guide, *args, **kwargs)
        extra = self._penalty(model, guide)
        return value if extra is None else value + extra.detach().item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Maintenance if due, then one backward pass of the wrapped ELBO's
        differentiable loss plus the penalties (for an ELBO without
        ``differentiable_loss``, its ``loss_and_grads`` and a second backward
        pass of the penalties). Returns the loss as a float."""
        if getattr(self.elbo, "differentiable_loss", None) is not None:
            loss = self.differentiable_loss(model, guide, *args, **kwargs)
            if loss.requires_grad:
                loss.backward(retain_graph=bool(self.elbo.retain_graph))
            return loss.detach().item()
        self._maintain(model, guide)
        value = self.elbo.loss_and_grads(model, guide, *args, **kwargs)
        extra = self._penalty(model, guide)
        self._remember(model, guide)
        if extra is None:
            return value
        if extra.requires_grad:
            extra.backward()
        return value + extra.detach().item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Maintenance if due (with grad enabled), then the wrapped ELBO's differentiable
        loss plus the penalties."""
        if torch.is_grad_enabled():
            self._maintain(model, guide)
        value = self.elbo.differentiable_loss(model, guide, *args, **kwargs)
        extra = self._penalty(model, guide)
        if torch.is_grad_enabled():
            self._remember(model, guide)
        return value if extra is None else value + extra


@dataclass
class FitResult:
    """What :func:`fit_density` returns.

    ``model`` is the fitted ``TransformedDistribution`` (its flow holds the
    best validation checkpoint, in eval mode); ``history`` has one entry per
    epoch under ``"train_nll"`` (mean over the epoch's batches, in nats) and
    ``"val_nll"`` (held-out, eval mode); ``split`` holds the row indices of
    the training and the held-out rows.
    """

    model: dist.TransformedDistribution
    best_val_nll: float
    best_epoch: int
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    split: tuple[torch.Tensor, torch.Tensor] | None = None


def fit_density(
    flow: torch.nn.Module,
    data: torch.Tensor,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-2,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    *,
    dequantize: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> FitResult:
    """Fits ``TransformedDistribution(N(0, I), flow)`` to ``data``'s rows by maximum likelihood.

    Adam on ``-log p(x)`` (nats) plus :func:`penalty` of the flow, with the
    flow's :class:`Maintenance` after every optimizer step, so every layer
    family trains correctly without further code. A held-out split
    (``val_fraction`` of the rows) is scored in eval mode after each epoch; the
    best state is kept and restored at the end. ``progress`` shows a tqdm
    bar on stderr with the live training NLL (refreshed a few times a second)
    and the last validation NLL; when stderr is not a terminal (a file, a CI
    log) it writes one plain line per epoch instead. Runs on the device and dtype of ``data``;
    the flow must already be there.

    When training diverges, is interrupted (``KeyboardInterrupt``) or
    raises, the flow is put back in its best known state (the best epoch's
    of this call; or its state at the call when no epoch finished or none
    scored better on the held-out rows), in eval mode, and the exception
    propagates; the divergence message, or a note on any other exception
    (Python 3.11+), says which state that is. Data no fit can succeed on
    (non-finite rows, constant columns, values whose squares overflow the
    dtype) and every other bad argument are refused before the flow is
    touched.

    Under an initialized ``torch.distributed`` process group (e.g. started
    by ``torchrun``) the fit is data-parallel, with the same call on every
    rank and the same ``data``: each rank trains on its share of every global
    batch of ``batch_size`` rows, the gradients and the validation NLL are
    reduced over the ranks, only rank 0 draws the progress bar, and every rank
    ends with the same flow, that of one process up to rounding (checked
    after every epoch); see :mod:`pyro_lunet.distributed`.

    The steps are public, for loops that need another shape: the split is
    :func:`train_val_split`'s (the same rows for the same ``val_fraction``
    and ``seed``), each epoch one :func:`train_epoch` with a
    :class:`Maintenance`.

    Example::

        >>> import torch
        >>> from pyro_lunet import activation_flow, fit_density
        >>> data = torch.randn(500, 2) @ torch.tensor([[1.0, 0.0], [0.8, 0.6]])
        >>> result = fit_density(activation_flow(2, 1, "rank_one", role="density"),
        ...                      data, epochs=3, progress=False)
        >>> len(result.history["val_nll"])
        3

    :param flow: a transform from base noise to data (``log_prob`` runs its
        inverse), e.g. a builder's flow with ``role="density"``.
    :param data: ``(N, D)`` rows.
    :param int epochs: passes over the training rows.
    :param int batch_size: rows per optimizer step.
    :param float lr: Adam's learning rate.
    :param float val_fraction: the held-out share, in (0, 1).
    :param int seed: seeds the split and the batch order (not the flow).
    :param bool progress: whether to show progress (``False``: silent).
    :param dequantize: for discrete data, a function ``(rows, generator) -> rows`` that
        adds noise (e.g. ``lambda x, g: L * pyro_lunet.image_flows.dequantize(x, L, g)``,
        ``x + U[0, 1)``): applied to every training batch with fresh noise each step,
        and once to the held-out rows, so that every epoch is scored on the same noise.
        The noise comes from a generator on ``data``'s device seeded with ``seed``, so
        a fit is reproducible (and the same on every rank). ``None`` (default): the
        rows are used as they are.
    :returns: a :class:`FitResult`.
    :raises ValueError: on bad arguments, including data with NaN or
        infinite rows (naming how many and which), constant columns in the
        training rows (naming them and their values) or values too large
        for ``data``'s dtype; the flow is left as it was.
    :raises FloatingPointError: when training diverges (the loss or the
        parameters become NaN or infinite), naming the epoch and the state the
        flow was restored to.
    """
    params = _check_fit_arguments(flow, data, epochs, batch_size, val_fraction)
    parallel = distributed.is_initialized()
    if parallel:  # every rank starts from rank 0's flow, with the same data
        distributed.check_same(data, "data")
        distributed.broadcast_module(flow)
    # One generator draws the split, then each epoch's batch order.
    gen = torch.Generator().manual_seed(seed)
    train, val, train_index, val_index = _split(data, val_fraction, gen)
    noise = None
    if dequantize is not None:
        noise = torch.Generator(device=data.device).manual_seed(seed)
        # Integer data may hold constant columns (a digit's corner pixel is always 0):
        # with noise they are no longer constant, so check what the model will see.
        val = dequantize(val, noise)
        _check_values(data, dequantize(train, noise))
    else:
        _check_values(data, train)
    # Without validation a NaN from a diverging step reaches the loss, which
    # is checked once an epoch, rather than failing deep inside Pyro.
    base = standard_normal(data.shape[1], data, validate_args=False)
    model = dist.TransformedDistribution(base, flow)
    # (val NLL, epoch, state) of the flow as it came (epoch -1), which a
    # failure falls back to when no epoch scores better: a fine-tuning run can
    # go wrong from its first epoch. Scoring it first also refuses a flow that
    # cannot score the data (e.g. the wrong input_dim) before its mode changes.
    at_call = (mean_nll(model, val, 4 * batch_size), -1, copy.deepcopy(flow.state_dict()))
    optimizer = torch.optim.Adam(params, lr=lr)
    maintenance = Maintenance(flow, optimizer)
    history: dict[str, list[float]] = {"train_nll": [], "val_nll": []}
    best = (math.inf, -1, None)  # the best epoch's, once one finishes
    bar = _Progress(epochs) if progress and distributed.is_main_process() else None
    start = time.perf_counter()
    diverged = None
    try:
        for epoch in range(epochs):
            perm = torch.randperm(train.shape[0], generator=gen).to(data.device)
            on_batch = None if bar is None else partial(_show_running, bar, epoch)
            batches = train[perm].split(batch_size)
            if noise is not None:  # fresh noise for every step
                batches = (dequantize(batch, noise) for batch in batches)
            train_nll = train_epoch(model, batches, optimizer, maintenance, on_batch)
            val_nll = mean_nll(model, val, 4 * batch_size)
            if not (math.isfinite(val_nll) and math.isfinite(train_nll)):
                diverged = _diverged(epoch, lr, _fallback(best, at_call))
                raise diverged
            if parallel:
                distributed.check_replicas(flow, f"after epoch {epoch + 1}")
            history["train_nll"].append(train_nll)
            history["val_nll"].append(val_nll)
            if val_nll < best[0]:
                best = (val_nll, epoch, copy.deepcopy(flow.state_dict()))
            if bar is not None:
                bar.show(epoch + 1, train_nll, val_nll)
    except BaseException as error:  # KeyboardInterrupt too: the user keeps the best state
        fallback = _fallback(best, at_call)
        _restore(flow, fallback)
        if error is not diverged and hasattr(error, "add_note"):  # add_note: Python 3.11+
            error.add_note(f"fit_density: {_restored(fallback)}")
        raise
    finally:  # end the bar's line, also when training fails or is interrupted
        if bar is not None:
            bar.close()
    _restore(flow, best)
    seconds = time.perf_counter() - start
    return FitResult(model, best[0], best[1], history, seconds, (train_index, val_index))


def _check_fit_arguments(
    flow: torch.nn.Module, data: torch.Tensor, epochs: int, batch_size: int, val_fraction: float
) -> list[torch.nn.Parameter]:
    """Refuses :func:`fit_density`'s bad arguments (all but the data's values);
    returns the flow's parameters."""
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.shape[1] == 0:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"data must be a tensor of shape (N, D), got {shape}")
    _check_val_fraction(val_fraction)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    params = list(flow.parameters())
    if not params:
        raise ValueError("flow has no parameters to fit")
    wrong = next((p for p in params if p.device != data.device or p.dtype != data.dtype), None)
    if wrong is not None:
        raise ValueError(
            f"flow parameters must be on data's device and dtype ({data.device}, {data.dtype}), "
            f"got ({wrong.device}, {wrong.dtype}); move the flow with .to(data)"
        )
    return params


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")


def train_val_split(
    data: torch.Tensor, val_fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training and held-out rows :func:`fit_density` uses for the same
    ``val_fraction`` and ``seed``.

    A random permutation of the rows (from a CPU generator seeded with
    ``seed``, so the split is the same on every device) whose first
    ``max(1, round(val_fraction * N))`` rows are held out.

    Example::

        >>> import torch
        >>> from pyro_lunet.training import train_val_split
        >>> train, val, train_index, val_index = train_val_split(torch.randn(10, 2), 0.2)
        >>> train.shape, val.shape, sorted(torch.cat([train_index, val_index]).tolist())
        (torch.Size([8, 2]), torch.Size([2, 2]), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])

    :param data: ``(N, ...)`` rows.
    :param float val_fraction: the held-out share, in (0, 1).
    :param int seed: seeds the permutation.
    :returns: ``(train, val, train_index, val_index)``: the rows and their
        indices into ``data`` (on ``data``'s device).
    :raises ValueError: when ``val_fraction`` is outside (0, 1) or the
        held-out split would take every row.
    """
    if not isinstance(data, torch.Tensor) or data.dim() == 0:
        raise ValueError(f"data must be a tensor of rows, got {type(data).__name__}")
    _check_val_fraction(val_fraction)
    return _split(data, val_fraction, torch.Generator().manual_seed(seed))


def _split(data: torch.Tensor, val_fraction: float, gen: torch.Generator) -> tuple:
    order = torch.randperm(data.shape[0], generator=gen).to(data.device)
    num_val = held_out_count(data.shape[0], val_fraction)
    if num_val >= data.shape[0]:
        raise ValueError(f"need more rows than the held-out split, got {data.shape[0]}")
    train_index, val_index = order[num_val:], order[:num_val]
    return data[train_index], data[val_index], train_index, val_index


def train_epoch(
    model: dist.TransformedDistribution,
    batches: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    maintenance: Maintenance | None = None,
    on_batch: Callable[[torch.Tensor], None] | None = None,
) -> float:
    """One pass of maximum-likelihood training over ``batches``, as :func:`fit_density` runs it.

    Puts the model's transforms in training mode; for each batch, one
    optimizer step on the mean ``-log p(x)`` plus :func:`penalty` of the
    transforms, followed by ``maintenance.step()``.

    :param model: a ``TransformedDistribution`` whose transforms are trained.
    :param batches: the batches of rows, in order.
    :param optimizer: a ``torch.optim.Optimizer`` over the transforms' parameters.
    :param maintenance: the :class:`Maintenance` to step after each
        optimizer step, or ``None`` (the layers then maintain themselves).
    :param on_batch: called after each batch with the running mean NLL as a
        0-dim tensor (reading it synchronizes with the device).
    :returns: the mean NLL over the epoch's rows, in nats (NaN or infinite
        when training diverged).
    :raises ValueError: when ``batches`` is empty.

    Under an initialized ``torch.distributed`` process group every rank
    passes the same global batches and trains on its share of each, the
    gradients summed over the ranks before the step
    (:mod:`pyro_lunet.distributed`): the same steps as one process, given
    the same flow on every rank to start from
    (:func:`pyro_lunet.distributed.broadcast_module`, which
    :func:`fit_density` runs).
    """
    modules = [t for t in model.transforms if isinstance(t, torch.nn.Module)]
    for module in modules:
        module.train()
    total, count = None, 0
    parallel = distributed.is_initialized()
    for batch in batches:
        if parallel:  # this rank's share of the global batch; gradients summed below
            loss, term = distributed.sharded_loss(model, batch, modules, penalty)
        else:
            nll = -model.log_prob(batch).mean()
            loss = nll + penalty(modules) if modules else nll
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if parallel:
            params = (p for group in optimizer.param_groups for p in group["params"])
            term = distributed.all_reduce_gradients(params, average=False, extra=term)
        else:
            term = nll.detach() * batch.shape[0]
        optimizer.step()
        if maintenance is not None:
            maintenance.step()
        total = term if total is None else total + term
        count += batch.shape[0]
        if on_batch is not None:
            on_batch(total / count)
    if total is None:
        raise ValueError("batches must hold at least one batch")
    return (total / count).item()


def _show_running(bar: _Progress, epoch: int, running: torch.Tensor) -> None:
    if bar.due():
        bar.show(epoch, running.item())


def _check_values(data: torch.Tensor, train: torch.Tensor) -> None:
    """Refuses data no fit can succeed on, with the reason, before training starts.

    Each check is one reduction on the device and one host read, plus more
    reads to word the error.
    """
    finite = torch.isfinite(data).all(dim=1)
    if not finite.all():
        bad = (~finite).nonzero().flatten()
        rows = ", ".join(str(i) for i in bad[:5].tolist()) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"data has {len(bad)} row{'s' * (len(bad) > 1)} with NaN or infinite values "
            f"(row{'s' * (len(bad) > 1)} {rows}); drop or impute them"
        )
    # A flow starts near the identity, so the base log-density first squares
    # each row's norm; past sqrt(max) that overflows, and the fit would fail
    # as if the learning rate were to blame. The 4 (16 on the square) leaves
    # room for the first steps and the batch mean.
    finfo = torch.finfo(data.dtype)
    if torch.linalg.vector_norm(data, dim=1).amax() > math.sqrt(finfo.max) / 4:
        dtype = str(data.dtype).removeprefix("torch.")
        fix = "" if data.dtype == torch.float64 else " or use float64"
        raise ValueError(
            f"data values up to {data.abs().amax().item():.3g} overflow {dtype} arithmetic; "
            f"standardize the data{fix}"
        )
    # Zero variance in a training column: the likelihood grows without bound
    # as the flow shrinks onto it.
    low, high = train.aminmax(dim=0)
    constant = (low == high).nonzero().flatten().tolist()
    if constant:
        many = len(constant) > 1
        cols = ", ".join(map(str, constant[:5])) + (", ..." if len(constant) > 5 else "")
        values = ", ".join(f"{v:g}" for v in low[constant[:5]].tolist())
        raise ValueError(
            f"data column{'s' * many} {cols} {'are' if many else 'is'} constant (every training "
            f"row is {values}{', in that order' * many}): "
            f"{'their' if many else 'its'} density is unbounded; "
            f"drop the column{'s' * many} or add noise"
        )


def _fallback(best: tuple, at_call: tuple) -> tuple:
    """The best known state after a failure: the best epoch's, unless no epoch
    finished or the state at the call scores better (NaN never does)."""
    return at_call if best[1] < 0 or at_call[0] < best[0] else best


def _restored(scored: tuple) -> str:
    """Which state :func:`_restore` put back, for error messages."""
    val_nll, epoch, _ = scored
    if epoch < 0:
        return f"the flow was restored to its state at the call (validation NLL {val_nll:.4f})"
    where = f"epoch {epoch + 1}, validation NLL {val_nll:.4f}"
    return f"the flow was restored to its best state ({where})"


def _restore(flow: torch.nn.Module, scored: tuple) -> None:
    flow.load_state_dict(scored[2])
    flow.eval()


def _diverged(epoch: int, lr: float, fallback: tuple) -> FloatingPointError:
    return FloatingPointError(
        f"training diverged in epoch {epoch + 1}: the loss or the parameters became NaN or "
        f"infinite; try a smaller learning rate than {lr:g}; {_restored(fallback)}"
    )


class _Progress:
    """:func:`fit_density`'s progress on ``file`` (stderr), drawn by tqdm.

    On a terminal, one tqdm bar over the epochs, with the live training NLL
    redrawn at most every ``interval`` seconds and the last validation NLL.
    Anywhere else (a file, a CI log, a notebook), no redraws: one line per
    finished epoch, in the same format.
    """

    FORMAT = "epoch {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}{postfix}]"

    def __init__(self, epochs: int, interval: float = 0.25, file=None):
        self.file = sys.stderr if file is None else file
        isatty = getattr(self.file, "isatty", None)
        self.live = bool(isatty and isatty())
        self.epochs, self.interval = epochs, interval
        self.val_nll: float | None = None
        self.last = -math.inf
        self.start = time.perf_counter()
        self.bar = (
            tqdm(
                total=epochs,
                file=self.file,
                bar_format=self.FORMAT,
                mininterval=interval,
                dynamic_ncols=True,
                leave=True,
            )  # fmt: skip
            if self.live
            else None
        )

    def due(self) -> bool:
        """Whether a live redraw is due (never off a terminal: no device sync is spent)."""
        return self.live and time.perf_counter() - self.last >= self.interval

    def _postfix(self, train_nll: float) -> str:
        val = "" if self.val_nll is None else f", val NLL {self.val_nll:.4f}"
        return f"train NLL {train_nll:.4f}{val} nats"

    def show(self, done: int, train_nll: float, val_nll: float | None = None) -> None:
        """The running NLL within an epoch, or (with ``val_nll``) the end of epoch ``done``."""
        self.last = time.perf_counter()
        if val_nll is not None:
            self.val_nll = val_nll
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(train_nll), refresh=False)
            self.bar.update(done - self.bar.n)
            self.bar.refresh()
        elif val_nll is not None:
            line = tqdm.format_meter(
                done, self.epochs, self.last - self.start, ncols=80,
                bar_format=self.FORMAT, postfix=self._postfix(train_nll), ascii=True,
            )  # fmt: skip
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
