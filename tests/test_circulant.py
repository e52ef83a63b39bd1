"""Circulant-diagonal (CDFlow) behaviour beyond the contract suite."""

from __future__ import annotations

import doctest
import itertools
import math

import pyro.distributions as dist
import pytest
import torch

import pyro_lunet.transforms.circulant as circulant_module
from pyro_lunet import CirculantDiagonalLinear, circulant_diagonal_linear
from pyro_lunet.transforms.circulant import _CirculantDiagonalChain


def _perturbed(dim, num_factors=2, init="orthogonal", scale=0.3, seed=0, **kw):
    torch.manual_seed(seed)
    layer = circulant_diagonal_linear(dim, num_factors=num_factors, init=init, **kw).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def _map_matrix(layer):
    """The matrix of the layer's forward map, read off the map itself: ``f(e_i) - f(0)``."""
    eye = torch.eye(layer.input_dim, dtype=torch.float64)
    with torch.no_grad():
        zero = layer(torch.zeros(1, layer.input_dim, dtype=torch.float64))
        return (layer(eye) - zero).T


def _circ(c):
    """The dense circulant ``circ(c)[i, l] = c[(i - l) mod D]``."""
    ar = torch.arange(c.shape[-1])
    return c[(ar[:, None] - ar[None, :]) % c.shape[-1]]


def _log_det_error(layer):
    """``|log_abs_det() - log|det J||`` for the map's own matrix J."""
    with torch.no_grad():
        return (layer.log_abs_det() - torch.linalg.slogdet(_map_matrix(layer))[1]).abs().item()


# ---------------------------------------------------------- real, Hermitian
@pytest.mark.parametrize("dim, num_factors", list(itertools.product([1, 2, 3, 4, 7, 8], [2, 3])))
def test_spectrum_is_hermitian_and_the_circulant_vectors_real(dim, num_factors):
    layer = _perturbed(dim, num_factors)
    with torch.no_grad():
        half = layer.spectra()
        c = layer.circulant_vectors()
        full = torch.fft.fft(c)
    assert c.dtype == torch.float64 and half.shape == (num_factors - 1, dim // 2 + 1)
    # fft(c) is the Hermitian extension of the stored half-spectrum ...
    torch.testing.assert_close(full[:, : dim // 2 + 1], half)
    k = torch.arange(1, (dim + 1) // 2)
    torch.testing.assert_close(full[:, dim - k], half[:, k].conj())
    # ... whose real bins are exactly real, with the stored signs and magnitudes.
    real_bins = [0] + ([dim // 2] if dim % 2 == 0 else [])
    assert (half[:, real_bins].imag == 0).all()
    torch.testing.assert_close(
        half[:, real_bins].real,
        layer.spectrum_sign * layer.log_magnitude[:, real_bins].exp(),
    )
    # Each circulant factor's log|det| is the one the layer counts for it.
    mult = torch.full((dim // 2 + 1,), 2.0, dtype=torch.float64)
    mult[real_bins] = 1.0
    for j in range(num_factors - 1):
        expected = torch.linalg.slogdet(_circ(c[j]))[1]
        torch.testing.assert_close((layer.log_magnitude[j] * mult).sum(), expected)


@pytest.mark.parametrize("dim", [4, 7, 8, 200])
def test_log_det_check_catches_complex_eigenvalues_with_their_real_part_taken(dim, monkeypatch):
    """The classic bug: free complex eigenvalues, a real map, and sum(log|lambda|).

    With rfft/irfft the bug is a real bin (DC, Nyquist) stored as a free complex
    number: irfft keeps only its real part, the log-det counts its modulus. The
    check used on the layer (log_abs_det against the map's own matrix) catches
    it, on the dense path (small D) and the FFT chain alike; with the full FFT
    and ``.real`` the error is as large.
    """
    correct = circulant_module._half_spectra

    def free_complex_real_bins(phase, log_magnitude, spectrum_sign, power, log_norm):
        spectra = correct(phase, log_magnitude, spectrum_sign, power, log_norm)
        turn = torch.zeros_like(spectra.real)
        turn[..., 0] = 0.9 * power
        if spectra.shape[-1] == phase.shape[-1] + 2:  # D even: a Nyquist bin
            turn[..., -1] = -0.6 * power
        return spectra * torch.polar(torch.ones_like(turn), turn)

    assert _log_det_error(_perturbed(dim)) < 1e-10
    monkeypatch.setattr(circulant_module, "_half_spectra", free_complex_real_bins)
    assert _log_det_error(_perturbed(dim)) > 0.3  # log(1 / cos 0.9) = 0.46

    # The same bug with the full FFT: random complex eigenvalues, c = ifft(.).real.
    eigenvalues = torch.polar(
        torch.ones(dim, dtype=torch.float64), 2 * math.pi * torch.rand(dim, dtype=torch.float64)
    )
    c = torch.fft.ifft(eigenvalues).real
    claimed = eigenvalues.abs().log().sum()
    assert (claimed - torch.linalg.slogdet(_circ(c))[1]).abs() > 0.3


def test_map_and_weight_are_real_and_agree():
    layer = _perturbed(9, 3)
    weight = layer.weight()
    assert weight.dtype == torch.float64
    torch.testing.assert_close(weight, _map_matrix(layer), rtol=1e-10, atol=1e-12)


# --------------------------------------------------- contract at D = 1024
@pytest.mark.parametrize("num_factors", [2, 3])
def test_contract_tolerances_hold_at_dim_1024_in_float64(num_factors):
    dim = 1024
    layer = _perturbed(dim, num_factors, scale=0.1)
    weight = layer.weight().detach()
    matrix = _map_matrix(layer)
    sign, log_abs_det = torch.linalg.slogdet(matrix)
    assert sign != 0
    torch.testing.assert_close(layer.log_abs_det().detach(), log_abs_det, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weight, matrix, rtol=1e-9, atol=1e-10)
    x = 3 * torch.randn(9, dim, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, x @ weight.T + layer.bias, rtol=1e-9, atol=1e-10)
        assert (layer.inv(y.clone()) - x).abs().max() < 1e-10
        z = 3 * torch.randn(9, dim, dtype=torch.float64)
        assert (layer(layer.inv(z)) - z).abs().max() < 1e-10


# ------------------------------------------------------------- edge dims
def test_dim_one_is_a_product_of_scalars():
    layer = _perturbed(1, 3)
    assert layer.phase.shape == (2, 0) and layer.log_magnitude.shape == (2, 1)
    scale = (layer.scale_sign * layer.log_scale.exp()).prod()
    spectrum = (layer.spectrum_sign * layer.log_magnitude.exp()).prod()
    torch.testing.assert_close(layer.weight(), (scale * spectrum).reshape(1, 1))
    torch.testing.assert_close(
        layer.log_abs_det(), layer.log_scale.sum() + layer.log_magnitude.sum()
    )


def test_dim_two_has_a_dc_and_a_nyquist_bin_and_no_phase():
    layer = _perturbed(2)
    assert layer.phase.shape == (1, 0) and layer.spectrum_sign.shape == (1, 2)
    lam = layer.spectrum_sign[0] * layer.log_magnitude[0].exp()  # DC, Nyquist
    c0, c1 = (lam[0] + lam[1]) / 2, (lam[0] - lam[1]) / 2
    circ = torch.stack([torch.stack([c0, c1]), torch.stack([c1, c0])])
    d1, d3 = layer.scale_sign * layer.log_scale.exp()
    torch.testing.assert_close(layer.weight(), torch.diag(d1) @ circ @ torch.diag(d3))
    torch.testing.assert_close(
        layer.log_abs_det(), layer.log_scale.sum() + layer.log_magnitude.sum()
    )


# ------------------------------------------------------------------ inits
@pytest.mark.parametrize("dim", [1, 2, 5, 8])
@pytest.mark.parametrize("num_factors", [2, 3])
def test_identity_init_is_the_identity(dim, num_factors):
    layer = circulant_diagonal_linear(dim, num_factors=num_factors).double()
    torch.testing.assert_close(layer.weight(), torch.eye(dim, dtype=torch.float64))
    assert layer.log_abs_det() == 0
    x = torch.randn(4, dim, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x)


@pytest.mark.parametrize("dim", [1, 2, 7, 64])
@pytest.mark.parametrize("num_factors", [2, 3])
def test_orthogonal_init_is_random_and_orthogonal(dim, num_factors):
    torch.manual_seed(dim)
    layer = circulant_diagonal_linear(dim, num_factors=num_factors, init="orthogonal").double()
    weight = layer.weight()
    eye = torch.eye(dim, dtype=torch.float64)
    torch.testing.assert_close(weight @ weight.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.log_abs_det(), torch.zeros((), dtype=torch.float64))
    if dim >= 7:
        other = circulant_diagonal_linear(dim, num_factors=num_factors, init="orthogonal")
        assert not torch.allclose(weight, other.double().weight())
        assert (layer.scale_sign < 0).any() and (layer.scale_sign > 0).any()
        assert layer.phase.abs().max() > 1.0


@pytest.mark.parametrize(
    "bad", [dict(num_factors=1), dict(num_factors=2.0), dict(init="haar"), dict(input_dim=0)]
)
def test_bad_arguments_are_value_errors(bad):
    kwargs = dict(input_dim=4) | bad
    with pytest.raises(ValueError):
        CirculantDiagonalLinear(**kwargs)


# ------------------------------------------------------- parameter count
@pytest.mark.parametrize("dim", [1, 2, 3, 10, 101, 1024])
@pytest.mark.parametrize("num_factors", [2, 3, 5])
def test_parameter_count_is_one_vector_per_factor(dim, num_factors):
    """(2m - 1) D numbers plus the bias: the paper's O(mD), matching a real c exactly."""
    layer = circulant_diagonal_linear(dim, num_factors=num_factors)
    count = sum(p.numel() for name, p in layer.named_parameters() if name != "bias")
    assert count == (2 * num_factors - 1) * dim
    assert layer.bias.numel() == dim
    assert sum(b.numel() for b in layer.buffers()) <= num_factors * dim + dim + 2 * num_factors


# ------------------------------------------------------------- invertible
def test_extreme_parameters_stay_invertible():
    dim = 12
    layer = circulant_diagonal_linear(dim, num_factors=3, init="orthogonal").double()
    with torch.no_grad():
        layer.log_scale.copy_(2 * torch.randn_like(layer.log_scale))
        layer.log_magnitude.copy_(2 * torch.randn_like(layer.log_magnitude))
        layer.phase.copy_(100 * torch.randn_like(layer.phase))
    log_det = layer.log_abs_det()
    sign, expected = torch.linalg.slogdet(layer.weight())
    assert sign != 0 and torch.isfinite(log_det)
    torch.testing.assert_close(log_det, expected, rtol=1e-9, atol=1e-9)
    x = torch.randn(5, dim, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer.inv(layer(x)), x, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "dim, num_factors, offset",
    [(1, 2, "pre"), (2, 3, "post"), (5, 2, None), (5, 3, "pre"), (8, 2, "post"), (8, 4, "pre")],
)
def test_hand_written_backward_passes_gradcheck(monkeypatch, dim, num_factors, offset):
    # Blocks of a few rows, so the block loop and a ragged last block are exercised.
    monkeypatch.setattr(circulant_module, "_BLOCK_BYTES", 3 * 8 * dim // torch.get_num_threads())
    torch.manual_seed(dim * num_factors)
    x = torch.randn(7, dim, dtype=torch.float64, requires_grad=True)
    off = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    pre, post = (
        (off, None) if offset == "pre" else (None, off) if offset == "post" else (None, None)
    )
    scales = (torch.rand(num_factors, dim, dtype=torch.float64) + 0.5).requires_grad_()
    layer = _perturbed(dim, num_factors)
    spectra = layer.spectra().detach().div(dim).requires_grad_()

    def chain(*args):
        return _CirculantDiagonalChain.apply(*args)

    assert torch.autograd.gradcheck(
        chain, (x, pre, post, scales, spectra), atol=1e-8, fast_mode=True
    )
    # Only some inputs needing a gradient (the forward then saves less).
    frozen = (x.detach(), pre, post, scales.detach(), spectra)
    assert torch.autograd.gradcheck(chain, frozen, atol=1e-8, fast_mode=True)
    frozen = (x.detach(), pre, post, scales, spectra.detach())
    assert torch.autograd.gradcheck(chain, frozen, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("direction", ["density", "guide"])
def test_parameter_gradients_match_autograd_through_the_dense_weight(monkeypatch, direction):
    dim, rows = 130, 100  # above the dense matrix's sizes: the FFT chain
    block_bytes = 40 * 8 * dim // torch.get_num_threads()  # ragged blocks of about 40 rows
    monkeypatch.setattr(circulant_module, "_BLOCK_BYTES", block_bytes)
    layer = _perturbed(dim, 3)
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    data = torch.randn(rows, dim, dtype=torch.float64) + 2

    def loss(fast):
        if direction == "density":  # scores with the inverse
            x = (
                layer.inv(data.clone())
                if fast
                else torch.linalg.solve(weight(), (data - layer.bias).T).T
            )
            return -(base.log_prob(x) - layer.log_abs_det()).sum()
        y = layer(data.clone()) if fast else data @ weight().T + layer.bias
        return (y.sin() * y).sum()

    def weight():
        return layer._dense()

    fast = torch.autograd.grad(loss(True), list(layer.parameters()))
    slow = torch.autograd.grad(loss(False), list(layer.parameters()))
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-8, atol=1e-10)


# -------------------------------------------------------------- no_grad memo
def test_no_grad_results_follow_in_place_parameter_updates():
    layer = _perturbed(6)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x.clone())
        layer.log_magnitude.add_(0.5)
        layer.phase.add_(0.5)
        after = layer(x.clone())
        torch.testing.assert_close(after, x @ layer.weight().T + layer.bias)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(layer.inv(after.clone()), x)


def test_float32_large_batch_round_trip_and_block_path():
    dim = 1000  # even, and rows split into several blocks
    torch.manual_seed(0)
    layer = circulant_diagonal_linear(dim, init="orthogonal")
    x = torch.randn(700, dim)
    with torch.no_grad():
        y = layer(x)
        assert (layer.inv(y.clone()) - x).abs().max() < 1e-4
        weight = layer.double().weight()
        expected = x.double() @ weight.T
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-4)


def test_docstring_example_runs():
    result = doctest.testmod(circulant_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_log_det_cost_does_not_touch_the_fft():
    """The log-determinant is a sum of parameters: O(mD), no transform."""
    layer = _perturbed(64, 3)
    with torch.profiler.profile() as prof:
        layer.log_abs_det()
    names = {e.name for e in prof.events()}
    assert not any("fft" in n for n in names)
    magnitude = layer.log_magnitude
    expected = layer.log_scale.sum() + magnitude[:, 0].sum() + magnitude[:, 32].sum()
    torch.testing.assert_close(layer.log_abs_det(), expected + 2 * magnitude[:, 1:32].sum())
