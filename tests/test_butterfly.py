"""Butterfly layers: the pairing for every D, the blocks, the grouped products.

The contract suite (tests/test_contract.py) checks the layer as a transform;
here the layer is checked against a level-by-level reference built from its
own description (:meth:`ButterflyLinear.pairs` and :meth:`ButterflyLinear.blocks`).
"""

from __future__ import annotations

import doctest
import math

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_lunet import ButterflyLinear, butterfly_linear, lu_linear
from pyro_lunet.transforms import butterfly as butterfly_module

PRIMES = (2, 3, 5, 7, 11, 13, 17, 31, 37, 61, 97, 101, 127, 131)
odd_or_prime = st.one_of(st.sampled_from(PRIMES), st.integers(1, 140).filter(lambda d: d % 2 == 1))


def _perturbed(dim, seed=0, scale=0.3, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    layer = butterfly_linear(dim, init="orthogonal", **kwargs).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def _levels(layer):
    return layer.num_levels


def _reference_apply(layer, x):
    """``W x`` for rows x, one level at a time, from ``pairs()`` and ``blocks()``."""
    pairs, blocks = layer.pairs(), layer.blocks().detach()
    for level in reversed(range(_levels(layer))):  # the smallest stride acts first
        sel = pairs[:, 0] == level
        j, k, m = pairs[sel, 1], pairs[sel, 2], blocks[sel]
        xj, xk = x[:, j], x[:, k]
        x = x.clone()
        x[:, j] = m[:, 0, 0] * xj + m[:, 0, 1] * xk
        x[:, k] = m[:, 1, 0] * xj + m[:, 1, 1] * xk
    return x


def _expected_pairs(dim, levels):
    """Level l pairs j with j + P / 2^(l+1) inside blocks of P / 2^l; no partner >= D."""
    padded = 1 << (dim - 1).bit_length()
    rows = []
    for level in range(levels):
        stride = padded >> (level + 1)
        rows += [
            (level, j, j + stride)
            for j in range(dim)
            if (j // stride) % 2 == 0 and j + stride < dim
        ]
    return rows


# ------------------------------------------------------------ construction
@settings(max_examples=30, deadline=None)
@given(dim=odd_or_prime, data=st.data())
def test_pairs_follow_the_butterfly_pattern_with_pass_through(dim, data):
    levels = data.draw(st.integers(0, (dim - 1).bit_length()))
    layer = butterfly_linear(dim, num_levels=levels)
    assert sorted(map(tuple, layer.pairs().tolist())) == sorted(_expected_pairs(dim, levels))
    # Each coordinate is in at most one block per level.
    for level in range(levels):
        coords = layer.pairs()[layer.pairs()[:, 0] == level, 1:].reshape(-1)
        assert coords.unique().numel() == coords.numel()
        assert coords.max().item() < dim if coords.numel() else True


def test_blocks_are_rotation_diagonal_shear():
    layer = _perturbed(37)
    theta, shear = layer.angle.detach(), layer.shear.detach()
    scale = layer.block_sign * layer.log_scale.detach().exp()
    cos, sin = theta.cos(), theta.sin()
    rot = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)
    upper = torch.zeros_like(rot)
    upper[:, 0, 0], upper[:, 0, 1], upper[:, 1, 1] = 1.0, shear, 1.0
    expected = rot @ torch.diag_embed(scale) @ upper
    torch.testing.assert_close(layer.blocks().detach(), expected)


@settings(max_examples=25, deadline=None)
@given(dim=odd_or_prime, seed=st.integers(0, 2**16), data=st.data())
def test_grouped_products_match_level_by_level(dim, seed, data):
    levels = data.draw(st.integers(0, (dim - 1).bit_length()))
    block_levels = data.draw(st.integers(1, 7))
    layer = _perturbed(dim, seed, num_levels=levels, block_levels=block_levels)
    x = torch.randn(4, dim, dtype=torch.float64)
    y = _reference_apply(layer, x)
    torch.testing.assert_close(layer(x), y + layer.bias)
    torch.testing.assert_close(
        layer.weight(), _reference_apply(layer, torch.eye(dim, dtype=x.dtype)).T
    )
    torch.testing.assert_close(layer.inv(y + layer.bias), x)


@pytest.mark.parametrize("dim", [784, 1000, 1024])
def test_grouping_never_changes_the_map(dim):
    ref = _perturbed(dim, scale=0.1)
    x = torch.randn(16, dim, dtype=torch.float64)
    expected = _reference_apply(ref, x) + ref.bias
    for block_levels in (1, 2, 3, 4, 6, 10):
        layer = butterfly_linear(dim, block_levels=block_levels).double()
        layer.load_state_dict(ref.state_dict())
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer.inv(expected), x)


@settings(max_examples=25, deadline=None)
@given(
    dim=odd_or_prime,
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_round_trip_and_log_det(dim, seed, dtype):
    layer = _perturbed(dim, seed, dtype=dtype, block_levels=(seed % 4) + 1)
    x = torch.randn(3, 5, dim, dtype=dtype)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert (layer.inv(y.clone()) - x).abs().max() < tol
    slogdet = torch.linalg.slogdet(layer.weight().double())
    assert slogdet.sign != 0
    torch.testing.assert_close(layer.log_abs_det().double(), slogdet.logabsdet, rtol=tol, atol=tol)


def test_float32_matches_float64_at_large_dim():
    layer = _perturbed(4096, scale=0.1)
    x = torch.randn(64, 4096, dtype=torch.float64)
    y64, x64 = layer(x), layer.inv(x)
    layer = layer.float()
    torch.testing.assert_close(layer(x.float()).double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.inv(x.float()).double(), x64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize(
    "dim, kwargs",
    [
        (8, {}),
        (5, {"block_levels": 1}),
        (12, {"num_levels": 2, "block_levels": 1}),
        (16, {"block_levels": 3}),
    ],
)
@pytest.mark.parametrize("path", ["grouped", "dense"])
def test_gradients_of_the_grouped_products(direction, dim, kwargs, path, monkeypatch):
    if path == "grouped":  # the grouped products, not the small-D dense matrix
        monkeypatch.setattr(butterfly_module, "_DENSE_MAX", 0)
    wrapper = _Direction(_perturbed(dim, **kwargs).with_cache(0), direction)
    names = [name for name, _ in wrapper.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in wrapper.parameters()]
    x = torch.randn(5, dim, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(wrapper, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *values))
    # Only the parameters: the data's gradient is skipped.
    assert torch.autograd.gradcheck(lambda *params: fn(x.detach(), *params), tuple(values))


class _Direction(torch.nn.Module):
    def __init__(self, layer, direction):
        super().__init__()
        self.layer, self.direction = layer, direction

    def forward(self, x):
        return self.layer._call(x) if self.direction == "forward" else self.layer._inverse(x)


def test_non_contiguous_inputs():
    layer = _perturbed(100)
    x = torch.randn(100, 7, dtype=torch.float64).T  # (7, 100), strided
    torch.testing.assert_close(layer(x), layer(x.contiguous()))
    torch.testing.assert_close(layer.inv(x), layer.inv(x.contiguous()))


# ------------------------------------------------------------- parameters
def test_parameter_count_is_two_d_log_d_at_powers_of_two():
    layer = butterfly_linear(1024)
    blocks = 1024 // 2 * 10
    assert sum(p.numel() for p in layer.parameters()) == 4 * blocks + 1024
    dense = sum(p.numel() for p in lu_linear(1024).parameters())
    assert sum(p.numel() for p in layer.parameters()) <= 0.021 * dense


@pytest.mark.parametrize("dim", [1, 3, 5, 100, 784, 1000])
def test_parameters_only_for_existing_pairs(dim):
    layer = butterfly_linear(dim, bias=False)
    pairs = len(_expected_pairs(dim, (dim - 1).bit_length()))
    assert sum(p.numel() for p in layer.parameters()) == 4 * pairs
    assert layer.block_sign.shape == (pairs, 2)


# ---------------------------------------------------------- what it holds
def _set_permutation(layer, perm):
    """Routes source j to perm[j] through the levels (bit 0 first) with swap blocks."""
    dim = layer.input_dim
    bits = (dim - 1).bit_length()
    index = {(l, j): i for i, (l, j, _) in enumerate(layer.pairs().tolist())}
    swap = {}
    pos = list(range(dim))
    for bit in range(bits):
        level = bits - 1 - bit
        for j in range(dim):
            p = pos[j]
            key = (level, p & ~(1 << bit))
            wants = ((p >> bit) & 1) != ((perm[j] >> bit) & 1)
            assert swap.setdefault(key, wants) == wants, "routes collide"
            if wants:
                pos[j] = p ^ (1 << bit)
    with torch.no_grad():
        for p in (layer.angle, layer.log_scale, layer.shear):
            p.zero_()
        layer.block_sign.fill_(1.0)
        for key, wants in swap.items():
            if wants:  # R(pi/2) diag(1, -1) = [[0, 1], [1, 0]]
                layer.angle[index[key]] = math.pi / 2
                layer.block_sign[index[key], 1] = -1.0


@pytest.mark.parametrize(
    "name, perm",
    [
        ("reversal", lambda d: [d - 1 - j for j in range(d)]),
        ("cyclic shift", lambda d: [(j + 1) % d for j in range(d)]),
        ("xor translation", lambda d: [j ^ 5 for j in range(d)]),
        ("one transposition", lambda d: [{2: 6, 6: 2}.get(j, j) for j in range(d)]),
    ],
)
def test_full_butterfly_expresses_permutations(name, perm):
    dim = 16
    layer = butterfly_linear(dim, bias=False).double()
    targets = perm(dim)
    _set_permutation(layer, targets)
    expected = torch.zeros(dim, dim, dtype=torch.float64)
    expected[targets, list(range(dim))] = 1.0
    torch.testing.assert_close(layer.weight(), expected, atol=1e-15, rtol=0)
    assert abs(layer.log_abs_det().item()) < 1e-15
    x = torch.randn(3, dim, dtype=torch.float64)
    torch.testing.assert_close(layer.inv(layer(x)), x)


def test_full_butterfly_mixes_everything_at_powers_of_two():
    layer = _perturbed(64)
    assert (layer.weight().abs() > 0).all()
    # With fewer levels, only coordinates equal modulo P / 2^L mix.
    layer = _perturbed(64, num_levels=3)
    support = layer.weight().abs() > 0
    j = torch.arange(64)
    torch.testing.assert_close(support, (j[:, None] % 8) == (j[None, :] % 8))


def test_pass_through_mixing_fraction_as_documented():
    fractions = {}
    for dim in (100, 1000):
        layer = _perturbed(dim, scale=0.1)
        support = _reference_apply(layer, torch.eye(dim, dtype=torch.float64)) != 0
        fractions[dim] = support.double().mean().item()
    assert 0.87 < fractions[100] < 0.89
    assert 0.95 < fractions[1000] < 0.97


# --------------------------------------------------------------- the blocks
def test_log_det_is_exact_where_a_vanishes():
    """``a = 0`` (a swap-like block) is where ``log|a| + log|d - bc/a|`` breaks."""
    layer = butterfly_linear(8, bias=False).double()
    with torch.no_grad():
        layer.angle.fill_(math.pi / 2)
        layer.log_scale.uniform_(-2, 2)
        layer.shear.uniform_(-3, 3)
    assert layer.blocks()[:, 0, 0].abs().max() < 1e-15
    torch.testing.assert_close(layer.log_abs_det(), torch.linalg.slogdet(layer.weight()).logabsdet)
    det = torch.linalg.det(layer.blocks())
    torch.testing.assert_close(det.abs().log(), layer.log_scale.sum(-1))


def test_blocks_invertible_for_extreme_parameters():
    layer = butterfly_linear(16, init="orthogonal").double()
    with torch.no_grad():
        layer.angle.uniform_(-100, 100)
        layer.log_scale.uniform_(-8, 8)
        layer.shear.uniform_(-50, 50)
    det = torch.linalg.det(layer.blocks())
    expected = layer.block_sign.prod(-1) * layer.log_scale.sum(-1).exp()
    torch.testing.assert_close(det, expected, rtol=1e-6, atol=0)
    x = torch.randn(4, 16, dtype=torch.float64)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(layer.inv(y), x, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- inits
def test_identity_init_is_the_identity():
    layer = butterfly_linear(100)
    assert isinstance(layer, ButterflyLinear)
    assert torch.equal(layer.weight(), torch.eye(100))
    assert layer.log_abs_det() == 0


@pytest.mark.parametrize("init", ["rotation", "orthogonal"])
@pytest.mark.parametrize("dim", [64, 100])
def test_random_inits_are_orthogonal(init, dim):
    torch.manual_seed(0)
    layer = butterfly_linear(dim, init=init).double()
    w = layer.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(dim, dtype=w.dtype))
    assert abs(layer.log_abs_det().item()) < 1e-12
    det = torch.linalg.det(layer.blocks())
    if init == "rotation":
        torch.testing.assert_close(det, torch.ones_like(det))
    else:  # reflections and rotations, with equal odds
        assert 0.3 < (det < 0).double().mean() < 0.7


# --------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_levels": 4}, r"num_levels must be in \[0, 3\]"),
        ({"num_levels": -1}, "num_levels"),
        ({"num_levels": 1.5}, "num_levels"),
        ({"block_levels": 0}, "block_levels"),
        ({"init": "random"}, "init must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        butterfly_linear(5, **kwargs)


def test_no_grad_blocks_are_memoized_until_a_step():
    layer = _perturbed(64)
    with torch.no_grad():
        first = layer._matrices(inverse=True)
        assert layer._matrices(inverse=True) is first
        layer.angle.add_(0.1)
        assert layer._matrices(inverse=True) is not first


def test_density_model_training_reduces_the_loss():
    torch.manual_seed(0)
    dim = 12
    cov = torch.randn(dim, dim)
    data = torch.randn(512, dim) @ cov.T / dim**0.5
    layer = butterfly_linear(dim)
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(dim), 1.0).to_event(1), [layer])
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = -model.log_prob(data).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first - 1.0


def test_docstring_examples_run():
    failures, tried = doctest.testmod(butterfly_module, verbose=False)
    assert tried > 0 and failures == 0
