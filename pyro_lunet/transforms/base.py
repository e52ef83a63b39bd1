"""The protocol every invertible linear layer shares.

A family file supplies only its math (:meth:`InvertibleLinear._matvec`,
:meth:`~InvertibleLinear._solve`, :meth:`~InvertibleLinear._log_abs_det`
and :meth:`~InvertibleLinear._dense`); this module owns the bias, input
validation, batching, Pyro's ``cache_size`` behaviour and a cache of derived
quantities that cannot go stale.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import constraints
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._fused import DenseSide, Kernel

__all__ = [
    "ROLES",
    "InvertibleLinear",
    "Role",
    "VersionedCacheModule",
    "check_choice",
    "check_input_dim",
    "check_positive_int",
    "check_square_matrix",
    "check_vector_input",
    "haar_orthogonal",
    "random_signs",
    "resolve_role",
]

#: The one direction keyword of every family and builder. ``"guide"``: the
#: layer's cheap or exact side is the sampling direction (``_call``), where a
#: variational guide spends its time; ``"density"``: it is the scoring
#: direction (``_inverse``, what ``log_prob`` runs), where a density model does.
Role = Literal["guide", "density"]
ROLES: tuple[str, ...] = ("guide", "density")

# The deprecated spellings (LU's ``product=``, SNF's ``exact=``), for one release.
_LEGACY_ROLES = {"forward": "guide", "inverse": "density"}
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_positive_int(name: str, value, optional: bool = False, minimum: int = 1):
    """Returns ``value`` if it is an int >= ``minimum`` (or ``None`` when ``optional``),
    else raises ``ValueError`` naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(
            f"{name} must be {expected}{' or None' if optional else ''}, got {value!r}"
        )
    return value


def check_input_dim(input_dim: int) -> int:
    """Returns ``input_dim`` if it is a positive int, else raises ``ValueError``."""
    return check_positive_int("input_dim", input_dim)


def check_vector_input(name: str, x, dim: int, reference: Tensor) -> None:
    """Raises ``ValueError`` (naming ``name``, what was expected and what came) unless ``x`` is
    a tensor of shape ``(..., dim)`` with ``reference``'s dtype and device."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} expects a Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name} expects inputs of shape (..., {dim}), got {tuple(x.shape)}")
    if x.dtype != reference.dtype:
        raise ValueError(f"{name} expects dtype {reference.dtype}, got {x.dtype}")
    if x.device != reference.device:
        raise ValueError(f"{name} expects device {reference.device}, got {x.device}")


def check_square_matrix(name: str, matrix, dim: int) -> Tensor:
    """``matrix`` as a float64 CPU tensor if it is an invertible ``(dim, dim)`` tensor."""
    if not isinstance(matrix, Tensor) or matrix.shape != (dim, dim):
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"{name} must be a tensor of shape {(dim, dim)}, got {shape}")
    matrix = matrix.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(matrix).all() or torch.linalg.slogdet(matrix)[0] == 0:
        raise ValueError(f"{name} must be an invertible matrix, got a singular one")
    return matrix


def haar_orthogonal(dim: int) -> Tensor:
    """A Haar-random ``(dim, dim)`` orthogonal matrix in float64, from torch's global generator."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # the sign fix makes the draw Haar


def random_signs(*shape: int) -> Tensor:
    """Independent uniform ``+-1`` entries in the default dtype."""
    return torch.randint(0, 2, shape).to(torch.get_default_dtype()) * 2 - 1


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Returns ``value`` if it is one of ``choices``, else raises ``ValueError``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _PACKAGE_DIR + os.sep
    ):
        frame, level = frame.f_back, level + 1
    return level


def resolve_role(role: str | None, default: str, **legacy: str | None) -> str:
    """The direction ``role`` (``default`` when ``None``), or a deprecated keyword's translation.

    ``legacy`` holds one deprecated keyword and its value (``product=...`` or
    ``exact=...``, ``None`` when not passed): ``"forward"`` means ``role="guide"``
    and ``"inverse"`` ``role="density"``. Passing it warns (``DeprecationWarning``
    naming the replacement); passing it together with ``role`` is a ``ValueError``.
    """
    ((name, value),) = legacy.items()
    if value is None:
        return check_choice("role", default if role is None else role, ROLES)
    if role is not None:
        raise ValueError(
            f"pass role= only: {name}= is its deprecated spelling, got role={role!r} "
            f"and {name}={value!r}"
        )
    check_choice(name, value, tuple(_LEGACY_ROLES))
    replacement = _LEGACY_ROLES[value]
    warnings.warn(
        f"{name}={value!r} is deprecated and will be removed in the next release; "
        f"use role={replacement!r}",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(),
    )
    return replacement


class LegacyDirection:
    """A read-only alias of ``role`` under a family's old keyword (``product``,
    ``exact``), for one release: ``"forward"`` for ``"guide"``, ``"inverse"`` for
    ``"density"``, with a ``DeprecationWarning``. A module pickled with the old
    attribute gets its ``role`` from it on loading (:meth:`translate`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @staticmethod
    def translate(module_type: type, state: dict) -> None:
        """Replaces an old keyword's attribute in a pickled ``state`` by ``role``."""
        for name in list(state):
            if isinstance(getattr(module_type, name, None), LegacyDirection):
                state["role"] = "guide" if state.pop(name) == "forward" else "density"

    def __get__(self, module, owner=None):
        if module is None:
            return self
        warnings.warn(
            f"{type(module).__name__}.{self.name} is deprecated and will be removed in the "
            "next release; read .role ('guide' for 'forward', 'density' for 'inverse')",
            DeprecationWarning,
            stacklevel=2,
        )
        return "forward" if module.role == "guide" else "inverse"


# Some optimizers write through ``p.data`` (Pyro's ClippedAdam does), which
# leaves ``p._version`` unchanged; counting every torch optimizer step (Pyro's
# optimizers wrap torch's) keys the caches on those updates too.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


def optimizer_step_count() -> int:
    """How many ``torch.optim.Optimizer`` steps (Pyro's included) this process has taken."""
    return _optimizer_steps[0]


register_optimizer_step_post_hook(_count_optimizer_step)


# Every submodule registered anywhere bumps this epoch, so a module tree's
# layout (the dicts holding its parameters and buffers) can be kept between
# calls: the dicts are read live, so replaced tensors (``.to()``) are seen;
# only a new submodule changes the layout. Without torch's hook (older
# versions) the layout is rebuilt on every call.
_structure_epoch = [0]
_register_module_hook = getattr(
    torch.nn.modules.module, "register_module_module_registration_hook", None
)
if _register_module_hook is not None:

    def _bump_structure_epoch(module, name, submodule):
        _structure_epoch[0] += 1

    _register_module_hook(_bump_structure_epoch)


def _module_tree(module: torch.nn.Module) -> list[torch.nn.Module]:
    """``module`` and its descendants, depth first (a shared module may appear twice)."""
    out = [module]
    for child in module._modules.values():
        if child is not None:
            out.extend(_module_tree(child))
    return out


class VersionedCacheModule(TransformModule):
    """A :class:`~pyro.distributions.TransformModule` whose caches cannot go stale.

    Pyro's ``cache_size=1`` keeps the last ``(x, y)`` pair and answers by
    tensor identity alone, so ``TransformedDistribution.log_prob`` of a fresh
    ``rsample`` skips the inverse. Here a hit also needs everything that
    decides the result, or what it may be used for, to be as it was:

    * the module's parameters and buffers: the same ``_version`` and storage
      (optimizer steps, in-place updates, ``load_state_dict`` and merges all
      bump the version) and the same ``requires_grad``;
    * no ``torch.optim`` optimizer step taken since, in this process (for
      optimizers that write through ``.data``, as Pyro's ``ClippedAdam``
      does);
    * the grad mode and the train/eval mode;
    * the queried tensor itself: not modified in place since, and, when it
      was the input of the cached call, the same ``requires_grad``.

    A backward pass through the cached result (which frees its graph) forgets
    it. So full-batch training on one data tensor needs no ``clear_cache()``
    calls (pyro#2542), and a result computed without a graph is never handed
    to a call that needs one. What the key cannot see: user code writing into
    a parameter through ``p.data`` (or ``with torch.no_grad(): p.copy_(...)``
    is fine, that bumps the version) outside an optimizer step; call
    ``clear_cache()`` after such a write.

    Derived quantities (assembled matrices, log-determinants) go through
    :meth:`_memo`, under the same key and only while no graph is recorded.
    Both caches are dropped on pickling and deep-copying, which therefore work
    on a used, trained module.
    """

    def __init__(self, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self._cache_key: tuple | None = None
        self._cache_token: object | None = None
        self._cache_query: tuple = ((0, 0), 0, False)
        self._cache_log_det: Tensor | None = None
        self._derived: dict[str, tuple[tuple, object]] = {}

    # Module's repr (with extra_repr) rather than Transform's bare "Name()".
    __repr__ = torch.nn.Module.__repr__

    _cache_log_det: Tensor | None = None  # for modules unpickled from before it existed

    #: Buffers that change without changing the map (e.g. bookkeeping), left
    #: out of the cache key so that updating them keeps a cached pair.
    _unkeyed_buffers: tuple[str, ...] = ()

    # The plumbing below is the base's alone: a family that overrides it
    # would have to re-implement caching, batching or the bias correctly.
    _sealed = ("__call__", "_inv_call", "_state_key")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Sealed by an ancestor: a class may seal what it defines itself.
        sealed = {name for base in cls.__mro__[1:] for name in vars(base).get("_sealed", ())}
        overridden = sorted(name for name in sealed if name in vars(cls))
        if overridden:
            raise TypeError(
                f"{cls.__name__} overrides {overridden}, which the base owns; use its hooks "
                "(_cache_extras, _unkeyed_buffers, _before_use and, for linear layers, "
                "_matvec, _solve, _log_abs_det, _dense, _affine_rows, _inverse_affine_rows)"
            )

    def _cache_extras(self) -> tuple:
        """Anything besides the tensors that decides a result (e.g. a mode flag); hashable."""
        return ()

    def _state_key(self) -> tuple:
        """What decides a cached result: modes, the optimizer step count, the extras, and
        ``(version, data_ptr, requires_grad)`` of every parameter and buffer of the module
        tree, less each submodule's own ``_unkeyed_buffers`` (a flow keys on its layers as
        they would).

        The tensors are read from the modules' own dicts on every call (``.to()``
        replaces buffers); ``named_modules`` would cost more than the rest of a small
        layer's call, so the dicts are found once per module structure. One loop, no
        intermediate lists: a flow asks for its key three times per SVI step.
        """
        key = [torch.is_grad_enabled(), self.training, optimizer_step_count()]
        key.extend(self._cache_extras())
        add = key.append
        for parameters, buffers, skip in self._tensor_layout():
            for t in parameters.values():
                if t is not None:
                    add((t._version, t.data_ptr(), t.requires_grad))
            for name, t in buffers.items():
                if t is not None and name not in skip:
                    add((t._version, t.data_ptr(), t.requires_grad))
        return tuple(key)

    def _first_parameter(self) -> Tensor | None:
        """The tree's first parameter (whose device and dtype inputs must have), or ``None``."""
        for parameters, _, _ in self._tensor_layout():
            for p in parameters.values():
                if p is not None:
                    return p
        return None

    def _tensor_layout(self) -> list[tuple[dict, dict, tuple[str, ...]]]:
        epoch = _structure_epoch[0] if _register_module_hook is not None else None
        cached = self.__dict__.get("_layout")
        if epoch is not None and cached is not None and cached[0] == epoch:
            return cached[1]
        layout = [
            (m._parameters, m._buffers, getattr(m, "_unkeyed_buffers", ()))
            for m in _module_tree(self)
        ]
        self.__dict__["_layout"] = (epoch, layout)
        return layout

    def _before_use(self) -> None:
        """Work owed since the last optimizer step, done before the module is used.

        Called first by every direction and by ``log_abs_det``, before any
        graph captures a parameter; a no-op unless a family needs it (the
        rank-one family merges here). It must not change the map.
        """

    def _call_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``y`` and, where it comes free with it, :math:`\\log|\\det J(x)|` (else ``None``).

        A flow computes both in one pass; the cache keeps the log-determinant
        with the pair, so ``log_prob`` after ``rsample`` reuses it.
        """
        return self._call(x), None

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x`` and, where it comes free with it, :math:`\\log|\\det J(x)|` (else ``None``)."""
        return self._inverse(y), None

    def _kernel(self, inverse: bool) -> tuple[Kernel, tuple] | None:
        """Optional hook: this step (``_call``, or ``_inverse`` with ``inverse``) as a
        :class:`~pyro_lunet.transforms._fused.Kernel` and its params, or ``None``.

        A flow runs consecutive kernels as one autograd node; return one only
        where that is faster (small D) and the step is closed-form.
        """
        return None

    def _apply_with_log_det(self, h: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """One uncached step of a :class:`~pyro_lunet.Flow`: the image of ``h`` and the log-det.

        ``inverse=False`` maps ``x = h`` to ``y``, ``inverse=True`` maps ``y = h``
        to ``x``; the log-determinant is the forward one, :math:`\\log|\\det
        J(x)|`, summed over this module's event dims: a 0-dim tensor when it
        does not depend on the point, else broadcastable to ``h``'s batch shape
        or, for an element-wise module, ``h``'s shape. The flow has called
        :meth:`_before_use` and checked ``h``; families override this to skip
        their own checks and compute the log-determinant alongside.
        """
        out = self._inverse(h) if inverse else self._call(h)
        x, y = (out, h) if inverse else (h, out)
        return out, self.log_abs_det_jacobian(x, y)

    def __call__(self, x: Tensor) -> Tensor:
        self._before_use()
        if self._cache_size == 0:
            return self._call(x)
        key = self._state_key()
        hit = self._cached(x, key, 0)
        if hit is not None:
            return hit
        y, log_det = self._call_and_log_det(x)
        self._remember(x, y, 0, key, log_det)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        self._before_use()
        if self._cache_size == 0:
            return self._inverse(y)
        key = self._state_key()
        hit = self._cached(y, key, 1)
        if hit is not None:
            return hit
        x, log_det = self._inverse_and_log_det(y)
        self._remember(x, y, 1, key, log_det)
        return x

    def _cached_log_det(self, x: Tensor, y: Tensor) -> Tensor | None:
        """The log-determinant kept with the cached pair, if ``(x, y)`` is that pair."""
        if self._cache_size == 0 or self._cache_log_det is None:
            return None
        if self._cached(x, self._state_key(), 0) is not y or y._version != self._cache_query[0][1]:
            return None
        return self._cache_log_det

    def _cached(self, query: Tensor, key: tuple, side: int) -> Tensor | None:
        """The cached partner of ``query`` (``x`` for side 0, ``y`` for 1), or ``None``."""
        pair = self._cached_x_y
        if pair[side] is not query or key != self._cache_key:
            return None
        versions, source, source_grad = self._cache_query
        if query._version != versions[side]:
            return None  # the tensor was modified in place
        # The partner of the call's own input was computed from it: it has a
        # graph to it exactly when the input required grad then.
        if side == source and query.requires_grad != source_grad:
            return None
        return pair[1 - side]

    def _remember(
        self, x: Tensor, y: Tensor, source: int, key: tuple, log_det: Tensor | None = None
    ) -> None:
        token = object()  # names this pair without holding it
        given = (x, y)[source]
        # Plain attributes: written past Module.__setattr__, which costs more
        # than the rest of this call.
        self.__dict__.update(
            _cached_x_y=(x, y),
            _cache_key=key,
            _cache_token=token,
            _cache_log_det=log_det,
            _cache_query=((x._version, y._version), source, given.requires_grad),
        )
        computed = (x, y)[1 - source]
        if computed.requires_grad:
            # A backward pass through the computed tensor frees its graph: the
            # pair must not be handed out again after that. The hook holds
            # only a token and a weak reference: holding the pair would make
            # a cycle through autograd's graph that Python's collector cannot
            # see, and every fresh batch would leak its x and y.
            module = weakref.ref(self)

            def forget(grad: Tensor) -> None:
                owner = module()
                if owner is not None and owner._cache_token is token:
                    owner.__dict__.update(_cached_x_y=(None, None), _cache_key=None)
                    owner.__dict__["_cache_log_det"] = None

            computed.register_hook(forget)

    def clear_cache(self) -> None:
        """Forgets the cached ``(x, y)`` pair and every derived quantity."""
        if self._cache_size:
            self._cached_x_y = None, None
        self._cache_key = None
        self._cache_log_det = None
        self._derived = {}

    def _memo(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, memoized while no autograd graph is being recorded.

        With grad enabled the value is recomputed on every call, so no graph is
        ever shared between two backward passes.
        """
        if torch.is_grad_enabled():
            return compute()
        key = self._state_key()
        hit = self._derived.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        self._derived[name] = (key, value)
        return value

    def with_cache(self, cache_size: int = 1) -> VersionedCacheModule:
        """A view of this module (the same parameters) with another ``cache_size``."""
        if cache_size == self._cache_size:
            return self
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        view = copy.copy(self)
        view._cache_size = cache_size
        view._inv = None
        view._cached_x_y = None, None
        view.clear_cache()
        return view

    def __getstate__(self) -> dict:
        # Cached tensors may carry autograd graphs, which can be neither
        # deep-copied nor pickled; they are cheap to rebuild.
        state = super().__getstate__()
        if "_cached_x_y" in state:
            state["_cached_x_y"] = None, None
        state["_cache_key"] = None
        state["_cache_log_det"] = None
        state["_derived"] = {}
        state.pop("_layout", None)  # holds the dicts of this very tree
        return state


class InvertibleLinear(VersionedCacheModule):
    r"""Abstract base of the invertible affine maps :math:`y = W x + b` on :math:`\mathbb{R}^D`.

    Subclasses implement the four hooks below on 2-D inputs ``(N, D)`` (and
    may override :meth:`_affine_rows` / :meth:`_inverse_affine_rows` to fuse
    the bias, :meth:`_before_use`, :meth:`_cache_extras` and
    ``_unkeyed_buffers``); the base class handles every batch shape
    ``(*batch, D)``, empty batches, the bias, input validation and caching,
    and refuses at class creation a subclass that overrides that plumbing
    (``_call``, ``_inverse``, ``__call__``, the cache key).

    Caching is :class:`VersionedCacheModule`'s: it never goes stale.

    :param int input_dim: the dimension D.
    :param bool bias: whether to learn a bias :math:`b` (else ``bias`` is ``None``).
    :param int cache_size: 0 or 1, as for Pyro's transforms.
    :param str role: ``"guide"`` or ``"density"`` (see :data:`Role`), validated and
        kept as ``self.role``; a family whose two directions cost differently
        orients itself by it, the others only record it.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self, input_dim: int, bias: bool = True, cache_size: int = 1, role: Role = "guide"
    ):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self.role = check_choice("role", role, ROLES)
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(input_dim))
        else:
            self.register_parameter("bias", None)

    def __setstate__(self, state: dict) -> None:
        LegacyDirection.translate(type(self), state)  # pickled before ``role``
        super().__setstate__(state)

    # ------------------------------------------------------------------ hooks
    def _matvec(self, x: Tensor) -> Tensor:
        """Rows of ``W x``: ``x`` is ``(N, D)``, returns ``(N, D)``."""
        raise NotImplementedError

    def _solve(self, y: Tensor) -> Tensor:
        """Rows of ``W^-1 y``: ``y`` is ``(N, D)``, returns ``(N, D)``."""
        raise NotImplementedError

    def _log_abs_det(self) -> Tensor:
        """``log|det W|`` as a 0-dim tensor."""
        raise NotImplementedError

    def _dense(self) -> Tensor:
        """The dense ``(D, D)`` matrix ``W``."""
        raise NotImplementedError

    # ------------------------------------------------------------- public API
    def weight(self) -> Tensor:
        """The dense matrix :math:`W` of the exact forward map. For inspection; O(D^2) or more."""
        return self._dense()

    def log_abs_det(self) -> Tensor:
        r""":math:`\log|\det W|`, a 0-dim tensor."""
        self._before_use()
        return self._log_abs_det()

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`\\log|\\det W|` broadcast to ``x.shape[:-1]`` (the Jacobian is constant)."""
        return self.log_abs_det().expand(x.shape[:-1])

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, bias={self.bias is not None}"

    def _use_dense_matrix(self) -> bool:
        """Whether the layer is applied as its dense matrix (:meth:`_dense_sides`) at this size:
        then its rows go through :meth:`_dense_rows`, and a flow runs it as a dense kernel."""
        return False

    def _kernel(self, inverse: bool) -> tuple[Kernel, DenseSide] | None:
        if self._use_dense_matrix() and torch.is_grad_enabled():  # else the memoized matrix
            return DenseSide(self, inverse).kernel()
        return None

    def _dense_group(self) -> tuple:
        """What layers must share to have their matrices assembled together (see
        :class:`~pyro_lunet.transforms._fused.DenseSide`); families add their shape options."""
        return (self.input_dim,)

    @classmethod
    def _dense_sides(cls, layers: list, inverse: bool) -> tuple[Sequence[Tensor], Tensor]:
        """Hook of families whose ``_kernel`` is a ``DenseSide``: the ``(D, D)`` matrices of
        ``layers`` for the direction (:math:`W`, or :math:`W^{-1}` with ``inverse``) and the sum
        of their forward log-determinants, differentiable, assembled for all layers at once."""
        raise NotImplementedError

    def _dense_rows(self, h: Tensor, inverse: bool) -> Tensor:
        """Rows of ``W h + b`` (or ``W^-1 (h - b)``) by the layer's dense matrix from
        :meth:`_dense_sides`, memoized while no graph is recorded; :math:`O(N D^2)`."""
        matrix = self._memo(
            "dense_inverse" if inverse else "dense_forward",
            lambda: self._dense_sides([self], inverse)[0][0],  # one layer: one matrix
        )
        if self.bias is None:
            return h @ matrix.t()
        if inverse:
            return (h - self.bias) @ matrix.t()
        return torch.addmm(self.bias, h, matrix.t())

    def _affine_rows(self, x: Tensor) -> Tensor:
        """Rows of ``W x + b`` for ``x`` of shape ``(N, D)``, N >= 1.

        Override to fuse the bias into the product's last pass.
        """
        y = self._matvec(x)
        return y if self.bias is None else y + self.bias

    def _inverse_affine_rows(self, y: Tensor) -> Tensor:
        """Rows of ``W^-1 (y - b)`` for ``y`` of shape ``(N, D)``, N >= 1.

        Override to fuse the bias into the solve's first pass.
        """
        if self.bias is None:
            return self._solve(y)
        if y.requires_grad or not self.bias.requires_grad:
            return self._solve(y - self.bias)
        # Data that needs no gradient (a density model's first layer): with
        # W^-1 (y - b) = W^-1 y - W^-1 b the bias's gradient takes one
        # matrix-vector solve instead of a gradient for the whole batch.
        return self._solve(y) - self._solve(self.bias.unsqueeze(0)).squeeze(0)

    # -------------------------------------------------------------- transform
    _sealed = (*VersionedCacheModule._sealed, "_call", "_inverse", "_apply_with_log_det")

    def _apply_with_log_det(self, h: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        rows = self._inverse_affine_rows if inverse else self._affine_rows
        return self._batched(rows, h), self._log_abs_det()

    def _call(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self._batched(self._affine_rows, x)

    def _inverse(self, y: Tensor) -> Tensor:
        self._check_input(y)
        return self._batched(self._inverse_affine_rows, y)

    def _batched(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x.clone()  # an empty batch: some kernels (MKL's FFT) refuse it
        if x.dim() == 2:
            return fn(x)
        return fn(x.reshape(-1, self.input_dim)).reshape(x.shape)

    def _reference(self) -> Tensor:
        return self._first_parameter()

    def _check_input(self, x: Tensor) -> None:
        check_vector_input(type(self).__name__, x, self.input_dim, self._reference())
