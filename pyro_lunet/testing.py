"""The layer protocol as a public check, like scikit-learn's ``check_estimator``.

:func:`check_layer` runs every promise a pyro-lunet layer makes (see the design
notes, "Conventions") on any factory ``make(input_dim) -> TransformModule`` and
raises an :class:`AssertionError` naming the first promise it finds broken. The
promises are also importable one by one (``check_jacobian``, ``check_round_trip``,
...): the project's own contract suite runs them over every family.
"""

from __future__ import annotations

import copy
import io
import pickle
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from torch import Tensor
from torch.distributions.utils import _sum_rightmost

__all__ = ["check_layer"]

Factory = Callable[[int], torch.nn.Module]

_EPS64 = torch.finfo(torch.float64).eps

# The guide check's target: a correlated 4-D Gaussian.
GUIDE_LOC = (1.0, -2.0, 0.5, 3.0)
GUIDE_COV = (
    (2.0, 0.8, 0.3, 0.0),
    (0.8, 1.0, 0.2, 0.1),
    (0.3, 0.2, 0.5, 0.1),
    (0.0, 0.1, 0.1, 1.5),
)


# ------------------------------------------------------------------ helpers
def tol(dtype: torch.dtype, tol64: float) -> float:
    """A float64 tolerance ``tol64`` scaled to ``dtype``'s precision.

    Grows as ``eps ** 0.85`` (float32: about 2.5e7 times ``tol64``): the
    float64 tolerances leave a margin of a few digits, and float32 errors of a
    chain of O(D) products, solves and Newton steps eat most of it.
    """
    return tol64 * (torch.finfo(dtype).eps / _EPS64) ** 0.85


def build(
    make: Factory,
    dim: int,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    perturb: float = 0.1,
    prepare: Callable[[torch.nn.Module], None] | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """``make(dim)`` moved to ``dtype`` and ``device``, every floating parameter
    perturbed by ``perturb * N(0, 1)`` (so no check runs at the identity), then
    ``prepare(module)`` if given."""
    torch.manual_seed(seed)
    module = make(dim).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(perturb * torch.randn_like(p))
    if prepare is not None:
        prepare(module)
    # A module without parameters works in any dtype: the checks' inputs
    # follow what it was built for.
    module._testing_where = (dtype, torch.device(device))
    return module


def is_linear(module: torch.nn.Module) -> bool:
    """Whether ``module`` offers ``weight()`` and ``log_abs_det()`` (an ``InvertibleLinear``)."""
    return callable(getattr(module, "weight", None)) and callable(
        getattr(module, "log_abs_det", None)
    )


def has_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def total_log_det(transform, x: Tensor, y: Tensor) -> Tensor:
    """``log|det J|`` of the map on R^D, summed over elementwise event dims."""
    ladj = transform.log_abs_det_jacobian(x, y)
    if transform.domain.event_dim == 0:
        return ladj.sum(-1)  # (_sum_rightmost cannot reshape an empty batch)
    return _sum_rightmost(ladj, 1 - transform.domain.event_dim)


def forward(transform, x: Tensor) -> Tensor:
    """``transform(x)`` computed afresh (a new tensor cannot hit a cache)."""
    return transform(x.clone())


def inverse(transform, y: Tensor) -> Tensor:
    """``transform.inv(y)`` computed afresh."""
    return transform.inv(y.clone())


def jacobian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    return torch.autograd.functional.jacobian(fn, x)


def standard_normal(dim: int, dtype=torch.float64, device="cpu"):
    zero = torch.zeros(dim, dtype=dtype, device=device)
    return dist.Normal(zero, torch.ones_like(zero)).to_event(1)


def _max_error(actual: Tensor, expected: Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.detach() - expected.detach()).abs().max().item()


def assert_close(
    actual: Tensor,
    expected: Tensor,
    promise: str,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """``torch.testing.assert_close`` (its dtype's default tolerances unless given)
    raising ``AssertionError("<promise> (max error 3.1e-02)")``."""
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{promise} (shape {tuple(actual.shape)}, expected {tuple(expected.shape)})"
        )
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as error:
        raise AssertionError(f"{promise} (max error {_max_error(actual, expected):.1e})") from error


def _assert_small(error: Tensor, bound: float, promise: str) -> None:
    value = error.abs().max().item() if error.numel() else 0.0
    if not value < bound:
        raise AssertionError(f"{promise} (max error {value:.1e}, allowed {bound:.1e})")


# ----------------------------------------------------------------- the map
def check_jacobian(t, dim: int, linear: bool = False) -> None:
    """``log_abs_det_jacobian`` (and, for a linear layer, ``weight()``,
    ``log_abs_det()`` and ``W x + b``) agree with autograd's Jacobian."""
    dtype = _dtype(t)
    x = _randn(t, dim)
    jac = jacobian(partial(forward, t), x)
    y = forward(t, x)
    sign, logabsdet = torch.linalg.slogdet(jac)
    if sign == 0:
        raise AssertionError(f"autograd's Jacobian is singular at D={dim}")
    strict, loose = tol(dtype, 1e-9), tol(dtype, 1e-10)
    assert_close(
        total_log_det(t, x, y),
        logabsdet,
        f"log_abs_det_jacobian disagrees with autograd's Jacobian at D={dim}",
        rtol=strict,
        atol=strict,
    )
    if not linear:
        return
    weight = t.weight()
    assert_close(
        weight, jac, f"weight() disagrees with autograd's Jacobian at D={dim}", strict, loose
    )
    assert_close(
        t.log_abs_det(),
        logabsdet,
        f"log_abs_det() disagrees with autograd's Jacobian at D={dim}",
        strict,
        strict,
    )
    assert_close(
        t.log_abs_det(),
        torch.linalg.slogdet(weight)[1],
        f"log_abs_det() disagrees with slogdet(weight()) at D={dim}",
        strict,
        strict,
    )
    bias = torch.zeros_like(x) if t.bias is None else t.bias
    assert_close(
        y,
        weight @ x + bias,
        f"forward disagrees with weight() @ x + bias at D={dim}",
        strict,
        loose,
    )


def check_inverse_jacobian(t, dim: int) -> None:
    """The inverse's Jacobian is the inverse of the forward's."""
    x = _randn(t, dim)
    y = forward(t, x)
    jac_inv = jacobian(partial(inverse, t), y)
    product = jac_inv @ jacobian(partial(forward, t), x)
    # float64: torch's defaults; lower precision: the round trip's tolerance.
    loose = None if x.dtype == torch.float64 else tol(x.dtype, 1e-10)
    assert_close(
        product,
        torch.eye(dim, dtype=x.dtype, device=x.device),
        f"the inverse's Jacobian is not the inverse of the forward's at D={dim}",
        rtol=loose,
        atol=loose,
    )


def check_round_trip(t, dim: int) -> None:
    """``inv(f(x)) == x`` and ``f(inv(y)) == y`` to float precision, bypassing caches."""
    bound = tol(_dtype(t), 1e-10)
    x = _randn(t, 9, dim) * 3
    _assert_small(inverse(t, forward(t, x)) - x, bound, f"inverse(forward(x)) != x at D={dim}")
    y = _randn(t, 9, dim) * 3
    _assert_small(forward(t, inverse(t, y)) - y, bound, f"forward(inverse(y)) != y at D={dim}")


# --------------------------------------------------------- shapes and dtypes
def check_batch_shape(t, dim: int, batch: tuple[int, ...]) -> None:
    """Any batch shape: the same rows as one at a time, log-det of shape ``batch``."""
    where = f"for batch shape {batch} at D={dim}"
    x = _randn(t, *batch, dim)
    y = forward(t, x)
    if y.shape != x.shape:
        raise AssertionError(f"forward returns shape {tuple(y.shape)} {where}")
    ladj = total_log_det(t, x, y)
    if ladj.shape != batch:
        raise AssertionError(f"log_abs_det_jacobian has shape {tuple(ladj.shape)} {where}")
    rows = x.reshape(-1, dim)
    expected = torch.stack([forward(t, r) for r in rows]).reshape(x.shape)
    assert_close(y, expected, f"batched forward differs from row by row {where}")
    assert_close(inverse(t, y), x, f"batched inverse(forward(x)) != x {where}")
    per_row = torch.stack([total_log_det(t, r, forward(t, r)) for r in rows]).reshape(batch)
    assert_close(ladj, per_row, f"batched log_abs_det_jacobian differs from row by row {where}")


def check_empty_batch(t, dim: int) -> None:
    """A ``(0, D)`` batch maps to ``(0, D)`` both ways, with a log-det of shape ``(0,)``."""
    x = _randn(t, 0, dim)
    y = forward(t, x)
    if y.shape != (0, dim):
        raise AssertionError(f"an empty batch (0, {dim}) maps to shape {tuple(y.shape)}")
    if inverse(t, y).shape != (0, dim):
        raise AssertionError(f"an empty batch (0, {dim}) inverts to another shape")
    ladj = total_log_det(t, x, y)
    if ladj.shape != (0,):
        raise AssertionError(
            f"an empty batch (0, {dim}) has log_abs_det_jacobian of shape {tuple(ladj.shape)}"
        )


def check_dtype(t, dim: int, dtype: torch.dtype) -> None:
    """Outputs and log-dets keep ``dtype``; the round trip holds to its precision."""
    x = _randn(t, 11, dim)
    y = t(x)
    if y.dtype != dtype:
        raise AssertionError(f"forward of {dtype} returns {y.dtype}")
    if total_log_det(t, x, y).dtype != dtype:
        raise AssertionError(f"log_abs_det_jacobian of {dtype} is not {dtype}")
    bound = 1e-4 if dtype == torch.float32 else tol(dtype, 1e-10)
    _assert_small(inverse(t, y) - x, bound, f"the round trip in {dtype} at D={dim} is off")


def check_bad_input(t, dim: int = 4) -> None:
    """A wrong last dim, dtype or device (and a 0-dim input) raise a ``ValueError``
    naming what was expected, in both directions, and corrupt nothing."""
    dtype, device = _dtype(t), _device(t)
    good = torch.randn(3, dim, dtype=dtype, device=device)
    y = t(good)
    other_dtype = torch.float32 if dtype != torch.float32 else torch.float64
    other_device = "cpu" if device.type != "cpu" else "meta"
    bad_inputs = {
        "last dim": (str(dim), torch.randn(3, dim + 1, dtype=dtype, device=device)),
        "dtype": (str(dtype).removeprefix("torch."), torch.randn(3, dim, dtype=other_dtype)),
        "device": (device.type, torch.empty(3, dim, dtype=dtype, device=other_device)),
    }
    for what, (expected, bad) in bad_inputs.items():
        for name, direction in (("forward", t), ("inverse", t.inv)):
            promise = f"a wrong {what} {tuple(bad.shape)}, {bad.dtype}, {bad.device} in {name}"
            try:
                direction(bad)
            except ValueError as error:
                if expected not in str(error):
                    raise AssertionError(
                        f"{promise} raises a ValueError that does not name {expected!r}: {error}"
                    ) from error
            except Exception as error:
                raise AssertionError(
                    f"{promise} raises {type(error).__name__}, not ValueError: {error}"
                ) from error
            else:
                raise AssertionError(f"{promise} raises no ValueError")
    try:
        t(torch.tensor(1.0, dtype=dtype, device=device))
    except ValueError:
        pass
    except Exception as error:
        raise AssertionError(
            f"a 0-dim input raises {type(error).__name__}, not ValueError"
        ) from error
    else:
        raise AssertionError("a 0-dim input raises no ValueError")
    if t(good) is not y:
        raise AssertionError("a failed call dropped the cached (x, y) pair")
    assert_close(inverse(t, y), good, "after a failed call the inverse is off")


# ---------------------------------------------------------------- training
def check_contiguous_parameters(t) -> None:
    """Pyro's param store copies a non-contiguous Parameter: the module's own would never train."""
    for name, p in t.named_parameters():
        if not p.is_contiguous():
            raise AssertionError(f"parameter {name!r} is not contiguous (Pyro would copy it)")


def check_gradients(t, dim: int = 5) -> None:
    """Every parameter gets a finite gradient from a density model's loss, some nonzero."""
    d = dist.TransformedDistribution(standard_normal(dim, _dtype(t), _device(t)), [t])
    loss = -d.log_prob(_randn(t, 32, dim)).mean()
    loss.backward()
    for name, p in t.named_parameters():
        if p.grad is None or not torch.isfinite(p.grad).all():
            raise AssertionError(f"parameter {name!r} gets no finite gradient")
    if not any(p.grad.abs().sum() > 0 for p in t.parameters()):
        raise AssertionError("every gradient is zero")


def check_no_stale_cache(t, dim: int = 5, steps: int = 3) -> None:
    """After each optimizer step, full-batch training on one tensor with no
    ``clear_cache()`` (pyro#2542) scores as a fresh copy does."""
    base = standard_normal(dim, _dtype(t), _device(t))
    d = dist.TransformedDistribution(base, [t])
    data = _randn(t, 64, dim)
    # Small steps: a deep flow's gradients can be large (leaky softplus's inverse
    # expands negative inputs tenfold per layer), and the check is about caching.
    opt = torch.optim.SGD(t.parameters(), lr=0.005)
    mode = "train" if t.training else "eval"
    for step in range(steps):
        opt.zero_grad()
        loss = -d.log_prob(data).mean()
        loss.backward()
        opt.step()
        fresh = copy.deepcopy(t)
        fresh.clear_cache()
        expected = dist.TransformedDistribution(base, [fresh]).log_prob(data)
        assert_close(
            d.log_prob(data),
            expected,
            f"a stale cached result after optimizer step {step + 1} (in {mode} mode)",
        )


def check_gradient_accumulation(t, dim: int = 4) -> None:
    """Two backward passes on one tensor without a step: the gradient doubles."""
    d = dist.TransformedDistribution(standard_normal(dim, _dtype(t), _device(t)), [t])
    data = _randn(t, 16, dim)
    (-d.log_prob(data).mean()).backward()
    first = [p.grad.clone() for p in t.parameters()]
    (-d.log_prob(data).mean()).backward()
    for (name, p), g0 in zip(t.named_parameters(), first):
        assert_close(p.grad, 2 * g0, f"a second backward pass on one tensor: {name!r}'s gradient")


def check_cached_rsample(t, dim: int = 5) -> None:
    """``log_prob`` of a fresh ``rsample`` (a cache hit) equals an uncached one."""
    base = standard_normal(dim, _dtype(t), _device(t))
    d = dist.TransformedDistribution(base, [t])
    y = d.rsample((8,))
    cached = d.log_prob(y)
    uncached = dist.TransformedDistribution(base, [t.with_cache(0)])
    assert_close(
        cached,
        uncached.log_prob(y.detach().clone()),
        "log_prob of a cached rsample differs from an uncached one",
    )
    if t.with_cache(t._cache_size) is not t:
        raise AssertionError("with_cache(its own cache_size) is not the module itself")


def check_frees_batches(t, dim: int) -> None:
    """The pair cache holds the last batch only: no earlier one stays alive (no leak)."""
    model = dist.TransformedDistribution(standard_normal(dim, _dtype(t), _device(t)), [t])
    params = [p for p in t.parameters() if p.requires_grad]
    alive = []
    for _ in range(3):
        x = _randn(t, 8, dim)
        alive.append(weakref.ref(x))
        (-model.log_prob(x).mean()).backward()
        for p in params:
            p.grad = None
        del x
    if [ref() is None for ref in alive[:-1]] != [True, True]:
        raise AssertionError("training on fresh batches keeps earlier batches alive (a leak)")


# ------------------------------------------------------------ serialization
def use(t, dim: int = 4) -> torch.nn.Module:
    """``t`` after a forward, a backward and an optimizer step: caches full."""
    d = dist.TransformedDistribution(standard_normal(dim, _dtype(t), _device(t)), [t])
    if has_parameters(t):
        opt = torch.optim.Adam(t.parameters(), lr=0.01)
        (-d.log_prob(_randn(t, 8, dim)).mean()).backward()
        opt.step()
    d.log_prob(d.rsample((3,)))
    return t


def _torch_round_trip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False, map_location=_device(module))


def check_copies(t, dim: int = 4) -> None:
    """A used module survives ``copy.deepcopy``, ``pickle`` and ``torch.save``."""
    x = _randn(t, 6, dim)
    expected = forward(t, x)
    for how, clone in (
        ("copy.deepcopy", lambda: copy.deepcopy(t)),
        ("pickle", lambda: pickle.loads(pickle.dumps(t))),
        ("torch.save", lambda: _torch_round_trip(t)),
    ):
        with _promise(f"{how} of a used module"):
            c = clone()
        assert_close(forward(c, x), expected, f"{how} of a used module: its forward differs")
        assert_close(
            inverse(c, expected),
            inverse(t, expected),
            f"{how} of a used module: its inverse differs",
        )


def check_state_dict(t, fresh, dim: int = 4) -> None:
    """``fresh.load_state_dict(t.state_dict())`` makes ``fresh`` the same map."""
    with _promise("load_state_dict of a used module into a fresh one"):
        fresh.load_state_dict(t.state_dict())
    x = _randn(t, 6, dim)
    y = forward(t, x)
    promise = "after a state_dict round trip into a fresh module"
    assert_close(forward(fresh, x), y, f"{promise} the forward differs")
    assert_close(
        total_log_det(fresh, x, y), total_log_det(t, x, y), f"{promise} the log-det differs"
    )


# ---------------------------------------------------------------- with Pyro
def check_change_of_variables(t, dim: int = 5) -> None:
    """``TransformedDistribution.log_prob`` is the change of variables."""
    base = standard_normal(dim, _dtype(t), _device(t))
    y = _randn(t, 10, dim)
    x = inverse(t, y)
    manual = base.log_prob(x) - total_log_det(t, x, y)
    assert_close(
        dist.TransformedDistribution(base, [t]).log_prob(y),
        manual,
        "TransformedDistribution.log_prob is not the change of variables",
    )


def check_guide(
    make: Factory,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    steps: int = 400,
    atol: float = 0.4,
    num_particles: int = 16,
    elbo: Callable | None = None,
    seed: int = 0,
) -> None:
    """``AutoNormalizingFlow(model, make)`` fits a correlated 4-D Gaussian by SVI.

    Plain ``Trace_ELBO`` (vectorized particles), ``ClippedAdam(lr=0.05,
    lrd=0.997)``; the fitted mean and covariance (from 20000 samples) must be
    within ``atol``. ``elbo(trace_elbo, optim)`` may wrap the loss. Without a
    bias nothing can shift the base ``N(0, I)``, so the target is then centred.
    """
    pyro.clear_param_store()
    torch.manual_seed(seed)
    cov = torch.tensor(GUIDE_COV, dtype=dtype, device=device)
    can_shift = all(getattr(m, "bias", 0) is not None for m in make(4).modules())
    loc = torch.tensor(GUIDE_LOC, dtype=dtype, device=device)
    if not can_shift:
        loc = torch.zeros_like(loc)
    scale_tril = torch.linalg.cholesky(cov)

    def model():
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    guide = AutoNormalizingFlow(model, lambda d: make(d).to(device=device, dtype=dtype))
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.997})
    loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    if elbo is not None:
        loss = elbo(loss, optim)
    svi = SVI(model, guide, optim, loss)
    with _promise("an AutoNormalizingFlow guide fit by SVI (Trace_ELBO)"):
        for _ in range(steps):
            svi.step()
        with torch.no_grad():
            z = guide.get_posterior().sample((20000,))
    promise = (
        f"an AutoNormalizingFlow guide does not fit a correlated 4-D Gaussian in {steps} steps"
    )
    assert_close(z.mean(0), loc, f"{promise}: its mean is off", rtol=0, atol=atol)
    assert_close(torch.cov(z.T), cov, f"{promise}: its covariance is off", rtol=0, atol=atol)


# ------------------------------------------------------------- check_layer
def check_layer(
    make: Factory,
    dims: Sequence[int] = (1, 2, 3, 5, 16),
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    linear: bool | None = None,
    guide: bool = True,
    perturb: float = 0.1,
    prepare: Callable[[torch.nn.Module], None] | None = None,
    seed: int = 0,
    name: str | None = None,
) -> None:
    r"""Checks every promise of pyro-lunet's layer protocol on a layer factory.

    Like scikit-learn's ``check_estimator``: for each promise a fresh module is
    built by ``make(input_dim)``, moved to ``dtype`` and ``device``, its
    floating parameters perturbed by ``perturb * N(0, 1)`` (so nothing is
    checked at the identity) and handed to ``prepare`` if given. The promises:

    * the map: ``log_abs_det_jacobian`` equals :math:`\log|\det J|` of
      autograd's Jacobian; for a linear layer also ``weight()`` is that
      Jacobian, ``log_abs_det()`` is ``slogdet(weight())`` and the forward is
      :math:`W x + b`; the inverse's Jacobian is :math:`J^{-1}`; the round
      trip ``inv(f(x)) = x`` and ``f(inv(y)) = y`` to float precision (all at
      every D in ``dims``; tolerances scale with ``dtype``'s eps);
    * shapes: no batch, ``(B,)`` and ``(B1, B2)`` give the rows one at a
      time would, with log-dets of the batch shape; an empty ``(0, D)`` batch
      gives ``(0, D)`` and log-dets of shape ``(0,)``; outputs keep ``dtype``;
      a wrong last dim, dtype or device raises a ``ValueError`` naming what
      was expected, in both directions;
    * training (layers with parameters): contiguous parameters, finite
      gradients, no stale cached result after an optimizer step (train and
      eval mode), gradient accumulation, cached ``rsample``/``log_prob``
      pairs, no batch kept alive by the cache;
    * a used module survives ``copy.deepcopy``, ``pickle``, ``torch.save``,
      and a ``state_dict`` round trip into a fresh module;
    * ``TransformedDistribution.log_prob`` is the change of variables; with
      ``guide=True`` (and parameters) ``AutoNormalizingFlow(model, make)``
      fits a correlated 4-D Gaussian with plain ``Trace_ELBO`` (400 steps,
      a few seconds).

    Example::

        >>> from functools import partial
        >>> from pyro_lunet import lu_linear
        >>> from pyro_lunet.testing import check_layer
        >>> check_layer(partial(lu_linear, init="orthogonal"), dims=(1, 3), guide=False)

    :param callable make: ``input_dim -> TransformModule`` on
        :math:`\mathbb{R}^D` (``event_dim`` 1, or elementwise).
    :param dims: the dimensions D at which the map is checked.
    :param torch.dtype dtype: ``torch.float64`` (strictest) or ``torch.float32``.
    :param device: where the module and the inputs live, e.g. ``"cuda"``.
    :param bool linear: whether the module has ``weight()`` and
        ``log_abs_det()``; detected when ``None``.
    :param bool guide: whether to fit an ``AutoNormalizingFlow`` guide.
    :param float perturb: the scale of the perturbation of the parameters.
    :param callable prepare: ``module -> None`` run after the perturbation
        (e.g. to re-sync an approximate inverse).
    :param int seed: the seed of every build and draw.
    :param str name: how messages call the layer; ``make``'s name by default.
    :raises AssertionError: naming the first broken promise, e.g.
        ``check_layer(lu_linear): log_abs_det_jacobian disagrees with
        autograd's Jacobian at D=5 (max error 3.1e-02)``.
    """
    label = name or _name(make)
    dims = tuple(dims)
    make_one = partial(
        build, make, dtype=dtype, device=device, perturb=perturb, prepare=prepare, seed=seed
    )
    try:
        with _promise("building the layer"):
            probe = make_one(dims[0] if dims else 4)
        if linear is None:
            linear = is_linear(probe)
        trainable = has_parameters(probe)
        for dim in dims:
            with _promise(f"the Jacobian check at D={dim}"):
                check_jacobian(make_one(dim), dim, linear=linear)
            with _promise(f"the inverse Jacobian check at D={dim}"):
                check_inverse_jacobian(make_one(dim), dim)
            with _promise(f"the round trip at D={dim}"):
                check_round_trip(make_one(dim), dim)
        for batch in ((), (7,), (6, 5)):
            with _promise(f"batch shape {batch}"):
                check_batch_shape(make_one(5), 5, batch)
        with _promise("an empty batch"):
            check_empty_batch(make_one(5), 5)
        with _promise(f"the {dtype} check"):
            check_dtype(make_one(16), 16, dtype)
        with _promise("the change of variables"):
            check_change_of_variables(make_one(5), 5)
        with _promise("copying a used module"):
            check_copies(use(make_one(4)), 4)
        if trainable:
            with _promise("the input validation"):
                check_bad_input(make_one(4), 4)
            with _promise("the parameters' layout"):
                check_contiguous_parameters(make(5))
            with _promise("the gradients"):
                check_gradients(make_one(5), 5)
            for mode in (True, False):
                with _promise("training with the cache"):
                    check_no_stale_cache(make_one(5).train(mode), 5)
            with _promise("gradient accumulation"):
                check_gradient_accumulation(make_one(4), 4)
            with _promise("the cached rsample"):
                check_cached_rsample(make_one(5), 5)
            with _promise("the cache on fresh batches"):
                dim = max(dims) if dims else 5
                check_frees_batches(make_one(dim), dim)
            with _promise("the state_dict round trip"):
                fresh = build(make, 4, dtype, device, perturb, prepare, seed + 1)
                check_state_dict(use(make_one(4)), fresh, 4)
            if guide:
                check_guide(make, dtype=dtype, device=device, seed=seed)
    except AssertionError as error:
        raise AssertionError(f"check_layer({label}): {error}") from error


# ------------------------------------------------------------------ private
@contextmanager
def _promise(what: str) -> Iterator[None]:
    """Turns an unexpected exception into an ``AssertionError`` naming ``what``."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as error:
        raise AssertionError(f"{what} raised {type(error).__name__}: {error}") from error


def _name(make) -> str:
    while isinstance(make, partial):
        make = make.func
    return getattr(make, "__name__", None) or repr(make)


def _reference(t) -> Tensor | None:
    return next(iter(t.parameters()), None)


def _dtype(t) -> torch.dtype:
    p = _reference(t)
    if p is not None:
        return p.dtype
    return getattr(t, "_testing_where", (torch.float64, None))[0]


def _device(t) -> torch.device:
    p = _reference(t)
    if p is not None:
        return p.device
    return getattr(t, "_testing_where", (None, torch.device("cpu")))[1]


def _randn(t, *shape: int) -> Tensor:
    return torch.randn(*shape, dtype=_dtype(t), device=_device(t))
