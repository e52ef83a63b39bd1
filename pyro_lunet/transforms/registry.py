"""The one registry of layer families.

A family registers itself once, in its own module, right after its factory::

    register_family("butterfly", butterfly_linear, directional=False, maintenance=False)

and from then on every place that lists or builds families reads it: the
builders (:func:`~pyro_lunet.activation_flow`, :func:`~pyro_lunet.coupling_flow`,
:func:`~pyro_lunet.layer_factory`), the command line's ``--flow BUILDER:FAMILY``
and the benchmark. :data:`FAMILIES` is the registry (a read-only mapping
``name -> Family``) and :func:`families` lists the names, in registration order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from pyro.distributions import TransformModule

__all__ = ["FAMILIES", "Family", "FamilyRegistry", "families", "register_family"]


@dataclass(frozen=True)
class Family:
    """A registered layer family.

    :param str name: the family's name (lowercase, underscores; the command
        line also accepts dashes).
    :param factory: ``factory(input_dim, role=..., **kwargs) -> TransformModule``.
    :param bool directional: whether the family's two directions differ in
        cost or exactness, so that ``role`` changes the layer (LU, SNF); for
        the others ``role`` is accepted and changes nothing.
    :param bool maintenance: whether training needs more than gradients: work
        the layer does itself from the optimizer steps it takes part in
        (rank-one merges), with explicit controls in :mod:`pyro_lunet.training`.
    """

    name: str
    factory: Callable[..., TransformModule]
    directional: bool = False
    maintenance: bool = False

    def __call__(self, input_dim: int, **kwargs) -> TransformModule:
        """A layer of this family: ``factory(input_dim, **kwargs)``."""
        return self.factory(input_dim, **kwargs)


class FamilyRegistry(Mapping):
    """A read-only mapping ``name -> Family``, filled by :meth:`register`."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def __getitem__(self, name: str) -> Family:
        return self._families[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._families)

    def __len__(self) -> int:
        return len(self._families)

    def __repr__(self) -> str:
        return f"FamilyRegistry({list(self._families)})"

    def register(
        self,
        name: str,
        factory: Callable[..., TransformModule],
        *,
        directional: bool,
        maintenance: bool,
    ) -> Family:
        """Adds a family; a name can be taken once (re-registering the same factory is a no-op)."""
        if not isinstance(name, str) or not name or name != name.lower() or "-" in name:
            raise ValueError(f"family name must be lowercase with underscores, got {name!r}")
        if not callable(factory):
            raise ValueError(f"factory for {name!r} must be callable, got {factory!r}")
        family = Family(name, factory, bool(directional), bool(maintenance))
        known = self._families.get(name)
        if known is not None and _qualname(known.factory) != _qualname(factory):
            raise ValueError(f"family {name!r} is already registered (by {known.factory!r})")
        self._families[name] = family  # the same factory again: a module reload
        return family

    def unregister(self, name: str) -> Family:
        """Removes a family (for plugins and tests); returns its record."""
        return self._families.pop(name)

    def lookup(self, name: str) -> Family:
        """The family called ``name`` (dashes read as underscores).

        :raises ValueError: for an unknown name, listing the registered ones.
        """
        key = name.replace("-", "_") if isinstance(name, str) else name
        if key not in self._families:
            raise ValueError(f"unknown family {name!r}; registered families: {list(self)}")
        return self._families[key]


def _qualname(factory) -> tuple:
    return (getattr(factory, "__module__", None), getattr(factory, "__qualname__", repr(factory)))


#: The registry of every layer family, filled as each family's module is imported.
FAMILIES = FamilyRegistry()


def register_family(
    name: str,
    factory: Callable[..., TransformModule],
    *,
    directional: bool = False,
    maintenance: bool = False,
) -> Family:
    """Registers a family in :data:`FAMILIES`; call it once, in the family's module."""
    return FAMILIES.register(name, factory, directional=directional, maintenance=maintenance)


def families() -> list[str]:
    """The registered family names, in registration order (``"lu"`` first)."""
    return list(FAMILIES)
