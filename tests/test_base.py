"""The base owns the plumbing: families supply math through hooks only."""

from __future__ import annotations

import pytest
import torch

from pyro_lunet.transforms import InvertibleLinear, VersionedCacheModule
from pyro_lunet.transforms.base import (
    check_positive_int,
    check_square_matrix,
    haar_orthogonal,
    random_signs,
)


@pytest.mark.parametrize("name", ["_call", "_inverse", "__call__", "_state_key"])
def test_a_family_cannot_override_the_plumbing(name):
    with pytest.raises(TypeError, match=name):
        type("Rogue", (InvertibleLinear,), {name: lambda self, *args: None})


def test_an_elementwise_module_may_define_its_directions():
    # VersionedCacheModule seals only the cache: _call/_inverse are its subclasses' math.
    type("Elementwise", (VersionedCacheModule,), {"_call": lambda self, x: x})
    with pytest.raises(TypeError, match="_state_key"):
        type("Rogue", (VersionedCacheModule,), {"_state_key": lambda self: ()})


def test_no_family_in_the_package_overrides_the_plumbing():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    sealed = {"_call", "_inverse", "__call__", "_inv_call", "_state_key"}
    families = [c for c in subclasses(InvertibleLinear) if c.__module__.startswith("pyro_lunet")]
    assert len(families) >= 5
    for family in families:
        assert not sealed & set(vars(family)), family


def test_shared_checks_and_initializers():
    assert check_positive_int("n", 3) == 3
    assert check_positive_int("n", None, optional=True) is None
    assert check_positive_int("n", 0, minimum=0) == 0
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n must be a positive int, got"):
            check_positive_int("n", bad)
    with pytest.raises(ValueError, match=r"m must be an int >= 2 or None, got 1"):
        check_positive_int("m", 1, optional=True, minimum=2)
    with pytest.raises(ValueError, match=r"shape \(3, 3\), got \(3, 2\)"):
        check_square_matrix("init", torch.zeros(3, 2), 3)
    with pytest.raises(ValueError, match="singular"):
        check_square_matrix("init", torch.ones(3, 3), 3)
    q = haar_orthogonal(5)
    torch.testing.assert_close(q @ q.T, torch.eye(5, dtype=torch.float64))
    signs = random_signs(1000)
    assert set(signs.tolist()) == {-1.0, 1.0} and signs.dtype == torch.get_default_dtype()
