"""The conditional channel mixer: exact per-image log-dets, inverses and broadcasting."""

from __future__ import annotations

import pytest
import torch

import pyro_lunet
from pyro_lunet import conditional_channel_mixer

FAMILIES = pyro_lunet.families()
C, H, W, CTX = 3, 2, 2, 2


def _perturbed(layer: str) -> pyro_lunet.ConditionalChannelMixer:
    torch.manual_seed(0)
    mixer = conditional_channel_mixer(C, CTX, layer=layer).double().eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return mixer


@pytest.mark.parametrize("layer", FAMILIES)
def test_log_det_and_inverse_per_context_against_autograd(layer):
    mixer = _perturbed(layer)
    contexts = torch.randn(3, CTX, dtype=torch.float64)
    x = torch.randn(3, C, H, W, dtype=torch.float64)
    t = mixer.condition(contexts)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert log_det.shape == (3,)
    for i in range(3):
        single = mixer.condition(contexts[i]).with_cache(0)

        def flat(v, single=single):
            return single(v.reshape(C, H, W)).reshape(-1)

        jac = torch.autograd.functional.jacobian(flat, x[i].reshape(-1))
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1])
        torch.testing.assert_close(y[i], single(x[i]))
    back = mixer.condition(contexts).with_cache(0).inv(y.clone())
    torch.testing.assert_close(back, x, atol=1e-9, rtol=1e-9)


def test_starts_as_the_mixer_and_broadcasts_contexts():
    torch.manual_seed(1)
    mixer = conditional_channel_mixer(C, CTX, layer="lu").double()
    x = torch.randn(C, H, W, dtype=torch.float64)
    contexts = torch.randn(4, CTX, dtype=torch.float64)
    y = mixer.condition(contexts)(x)  # one image, four contexts
    assert y.shape == (4, C, H, W)
    torch.testing.assert_close(y, mixer.mixer(x).expand(4, C, H, W))


def test_gradients_reach_the_context_network():
    mixer = _perturbed("butterfly").train()
    contexts = torch.randn(5, CTX, dtype=torch.float64)
    x = torch.randn(5, C, H, W, dtype=torch.float64)
    t = mixer.condition(contexts)
    y = t(x)
    (y.square().sum() + t.log_abs_det_jacobian(x, y).sum()).backward()
    assert mixer.context_net[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in mixer.linear.parameters())


def test_bad_inputs_raise_clear_errors():
    mixer = conditional_channel_mixer(C, CTX)
    t = mixer.condition(torch.randn(2, CTX))
    with pytest.raises(
        ValueError, match=r"images of shape \(\.\.\., 3, H, W\), got \(2, 4, 2, 2\)"
    ):
        t(torch.randn(2, 4, H, W))
    with pytest.raises(ValueError, match="broadcasts with the context"):
        t(torch.randn(3, C, H, W))
    with pytest.raises(ValueError, match="context of shape"):
        mixer.condition(torch.randn(2, CTX + 1))
    with pytest.raises(ValueError, match="ChannelMixer"):
        pyro_lunet.ConditionalChannelMixer(pyro_lunet.lu_linear(3), CTX)
