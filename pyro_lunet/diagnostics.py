r"""A variational posterior next to MCMC in ArviZ, and how far to trust it.

* :func:`to_inference_data`: draws from a fitted guide as an
  ``arviz.InferenceData`` shaped like ``az.from_pyro(mcmc)`` (a ``posterior``
  group with ``(chain, draw, *site dims)`` variables, one per latent site of
  the model, in the model's constrained space; an ``observed_data`` group), so
  ``az.summary``, ``az.plot_posterior`` and ``az.plot_forest`` take a guide
  and a NUTS run side by side.
* :func:`psis_khat`: the Pareto :math:`\hat k` of the importance weights
  :math:`p(x, z) / q(z)`, :math:`z \sim q` (Yao, Vehtari, Simpson, Gelman,
  "Yes, but Did It Work?: Evaluating Variational Inference", ICML 2018),
  through ``arviz.psislw``.

Both run the guide and model in eval mode under ``no_grad`` (so layers with a
training-mode approximation, like self-normalizing ones, report exact
densities) and restore the modes afterwards. Both draw all samples at once
inside one ``pyro.plate`` by default (``vectorize=True``, for models written
with plates): one pass of the model and guide. A model that cannot run
vectorized (one written for a single draw, whose sites do not broadcast
against an extra batch dim) falls back, with a warning, to running the pair
once per draw, ``num_samples`` passes; ``vectorize=False`` asks for that
directly.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.util import prune_subsample_sites

__all__ = ["PSISDiagnostic", "khat_reading", "psis_khat", "to_inference_data"]


class PSISDiagnostic(float):
    """What :func:`psis_khat` returns: the Pareto :math:`\\hat k`, a ``float`` (as
    Pyro's :func:`~pyro.infer.importance.psis_diagnostic` returns), carrying its
    reading (:func:`khat_reading`) as ``.reading``.

    Code written for the ``(khat, reading)`` named tuple this used to be keeps
    working: ``.khat`` is the plain float, ``khat, reading = result`` unpacks
    and ``result == (khat, reading)`` compares.
    """

    __slots__ = ("reading",)

    def __new__(cls, khat: float, reading: str | None = None):
        self = super().__new__(cls, khat)
        self.reading = khat_reading(khat) if reading is None else reading
        return self

    @property
    def khat(self) -> float:
        return float(self)

    def __iter__(self):
        return iter((float(self), self.reading))

    def __eq__(self, other):
        return tuple(self) == other if isinstance(other, tuple) else float.__eq__(self, other)

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = float.__hash__

    def __repr__(self) -> str:
        return f"PSISDiagnostic(khat={float(self)!r}, reading={self.reading!r})"


def khat_reading(khat: float) -> str:
    r"""The standard reading of a Pareto :math:`\hat k`.

    ``"good"`` below 0.5 (importance sampling from the guide converges
    quickly; the guide is close to the posterior), ``"usable"`` below 0.7
    (estimates are usable, with more draws), ``"do not trust"`` otherwise
    (or when :math:`\hat k` is NaN): the guide misses mass the posterior
    has.
    """
    if math.isnan(khat) or khat >= 0.7:
        return "do not trust"
    return "good" if khat < 0.5 else "usable"


@contextlib.contextmanager
def _evaluating(*fns):
    """Eval mode for the ``torch.nn.Module``\\ s among ``fns``, no_grad; modes restored."""
    modules = [f for f in fns if isinstance(f, torch.nn.Module)]
    modes = [[(m, m.training) for m in root.modules()] for root in modules]
    try:
        for root in modules:
            root.eval()
        with torch.no_grad():
            yield
    finally:
        for saved in modes:
            for module, training in saved:
                module.training = training


def _one_pass(model, guide, args, kwargs):
    """One unvectorized (guide, replayed model) trace pair, subsample sites pruned."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def _latent_sites(model_trace) -> dict[str, torch.Size]:
    return {
        name: site["value"].shape
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def _plate_nesting(*traces) -> int:
    """The number of batch dims any site uses (plates, or batch shapes without one)."""
    nesting = 0
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
            nesting = max(nesting, len(site["fn"].batch_shape), *dims)
    return nesting


def _draws(model, guide, args, kwargs, num_samples: int, vectorize: bool):
    """``num_samples`` guide draws: latent values ``(num_samples, *shape)`` per site,
    log importance weights ``(num_samples,)``, and the observed values."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    with _evaluating(model, guide):
        model_trace, guide_trace = _one_pass(model, guide, args, kwargs)
        shapes = _latent_sites(model_trace)
        observed = {
            name: site["value"]
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and site["is_observed"]
        }
        if vectorize:
            nesting = _plate_nesting(model_trace, guide_trace)
            try:
                samples, log_weights = _vectorized_draws(
                    model, guide, args, kwargs, num_samples, shapes, nesting
                )
            # The pair just ran once unvectorized, so whatever fails here is
            # the vectorization (sites that do not broadcast against the
            # particle dim, Python control flow on a sampled value, memory):
            # the serial loop gives the same draws.
            except Exception as error:
                reason = (str(error).splitlines() or [""])[0]
                warnings.warn(
                    f"the model and guide could not be vectorized over {num_samples} draws "
                    f"({type(error).__name__}: {reason}); falling back to one draw at a time, "
                    "which is slower. Write them for vectorized particles, or pass "
                    "vectorize=False to skip this attempt.",
                    stacklevel=3,
                )
                vectorize = False
        if not vectorize:
            samples, log_weights = _serial_draws(model, guide, args, kwargs, num_samples, shapes)
    return samples, log_weights, observed


def _vectorized_draws(model, guide, args, kwargs, num_samples, shapes, nesting):
    """All draws in one pass, the pair run inside a particle ``pyro.plate``."""
    log_weights, model_trace, _ = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=nesting, **kwargs
    )
    if log_weights.shape != (num_samples,):
        raise ValueError(f"log weights of shape {tuple(log_weights.shape)}")
    # Sites outside some plates carry singleton dims there; drop them.
    samples = {
        name: model_trace.nodes[name]["value"].reshape(num_samples, *shape)
        for name, shape in shapes.items()
    }
    return samples, log_weights


def _serial_draws(model, guide, args, kwargs, num_samples, shapes):
    """The draws one pass of the pair at a time."""
    values: dict[str, list] = {name: [] for name in shapes}
    weights = []
    for _ in range(num_samples):
        model_trace, guide_trace = _one_pass(model, guide, args, kwargs)
        weights.append(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
        for name in shapes:
            values[name].append(model_trace.nodes[name]["value"])
    return {name: torch.stack(v) for name, v in values.items()}, torch.stack(weights)


def to_inference_data(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    num_chains: int = 1,
    vectorize: bool = True,
    coords: dict | None = None,
    dims: dict | None = None,
    **kwargs,
):
    r"""A fitted guide's posterior as ``arviz.InferenceData``, shaped like ``az.from_pyro``.

    The ``posterior`` group has one variable per latent (non-observed) sample
    site of ``model``, shaped ``(chain, draw, *site shape)`` with ArviZ's
    default dimension names (``{site}_dim_0``...) unless ``coords``/``dims``
    say otherwise, exactly as ``az.from_pyro(mcmc)`` builds it; the
    ``observed_data`` group holds the model's observed sites. The draws are
    independent, so ``num_chains`` only splits them into equal chains (R-hat
    then compares independent halves and should read 1).

    Example::

        >>> import arviz as az, pyro, torch, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyro_lunet import to_inference_data
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> guide = AutoNormal(model)
        >>> idata = to_inference_data(model, guide, torch.zeros(5), num_samples=200)
        >>> dict(idata.posterior["mu"].sizes)
        {'chain': 1, 'draw': 200}

    :param model: the Pyro model.
    :param guide: the fitted guide (any callable guide of ``model``).
    :param args: the model's and guide's positional arguments.
    :param int num_samples: draws in all (``num_chains`` x draws per chain).
    :param int num_chains: chains to split the draws into.
    :param bool vectorize: draw all at once in a ``pyro.plate`` (one pass of
        the model and guide; a model that cannot run so falls back to the
        serial loop, with a warning), or run the pair once per draw
        (``num_samples`` passes).
    :param coords: ArviZ coordinates, as for ``az.from_pyro``.
    :param dims: ArviZ dimensions per variable, as for ``az.from_pyro``.
    :param kwargs: the model's and guide's keyword arguments.
    """
    import arviz as az
    from arviz.data.base import dict_to_dataset

    if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
        raise ValueError(f"num_chains must be a positive int, got {num_chains!r}")
    if not isinstance(num_samples, int) or num_samples % num_chains:
        raise ValueError(
            f"num_samples must be a multiple of num_chains={num_chains}, got {num_samples!r}"
        )
    samples, _, observed = _draws(model, guide, args, kwargs, num_samples, vectorize)
    draws = num_samples // num_chains
    posterior = {
        name: value.reshape(num_chains, draws, *value.shape[1:]).cpu().numpy()
        for name, value in samples.items()
    }
    groups = {"posterior": dict_to_dataset(posterior, library=pyro, coords=coords, dims=dims or {})}
    if observed:
        groups["observed_data"] = dict_to_dataset(
            {name: value.cpu().numpy() for name, value in observed.items()},
            library=pyro,
            coords=coords,
            dims=dims or {},
            default_dims=[],
        )
    return az.InferenceData(**groups)


def psis_khat(
    model, guide, *args, num_samples: int = 1000, vectorize: bool = True, **kwargs
) -> PSISDiagnostic:
    r"""The Pareto :math:`\hat k` of the importance weights of ``guide`` for ``model``'s posterior.

    Draws :math:`z_s \sim q`, computes :math:`\log w_s = \log p(x, z_s) -
    \log q(z_s)` (all sample sites of the model and guide, so the guide's
    change-of-variables terms are included) and fits a generalized Pareto
    tail to them with ``arviz.psislw``. The reading (:func:`khat_reading`):
    below 0.5 the guide is good, below 0.7 usable, above it do not trust it
    (the guide is too narrow somewhere the posterior is not). More draws
    give a steadier estimate; a few hundred is the least that means much.
    When all weights are equal (the guide is the posterior up to its
    normalizing constant) there is no tail to fit and :math:`\hat k` is
    reported as ``-inf``. Costs one vectorized pass of the model and guide
    (or ``num_samples`` passes, see ``vectorize``) and a sort of the weights.

    Example::

        >>> import pyro, torch, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyro_lunet import psis_khat
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def exact_guide():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> khat = psis_khat(model, exact_guide, num_samples=500)
        >>> float(khat), khat.reading
        (-inf, 'good')

    :param model: the Pyro model.
    :param guide: the fitted guide.
    :param int num_samples: draws from the guide.
    :param bool vectorize: as for :func:`to_inference_data`.
    :returns: :math:`\\hat k`, a ``float`` carrying its reading (a
        :class:`PSISDiagnostic`).
    """
    import arviz as az

    _, log_weights, _ = _draws(model, guide, args, kwargs, num_samples, vectorize)
    log_weights = log_weights.detach().to("cpu", torch.float64)
    if torch.isnan(log_weights).any() or torch.isposinf(log_weights).any():
        raise ValueError("log importance weights contain NaN or +inf: check model and guide")
    if log_weights.max() - log_weights.min() <= 1e-9 * (1.0 + log_weights.abs().max()):
        khat = -math.inf  # constant weights: q is the posterior (no tail to fit)
    else:
        _, khat = az.psislw(log_weights.numpy())
        khat = float(khat)
    return PSISDiagnostic(khat)
