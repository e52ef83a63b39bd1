"""The version-keyed caches of the shared base."""

from __future__ import annotations

import pyro.distributions as dist
import torch

from pyro_lunet import lu_linear, lu_net


def _normal(dim):
    return dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)


def test_rsample_then_log_prob_reuses_the_forward_pass(monkeypatch):
    layer = lu_linear(4, init="orthogonal")
    calls = []
    original = layer._inverse
    monkeypatch.setattr(layer, "_inverse", lambda y: calls.append(1) or original(y))
    d = dist.TransformedDistribution(_normal(4), [layer])
    d.log_prob(d.rsample((3,)))
    assert calls == []
    d.log_prob(torch.randn(3, 4))
    assert calls == [1]


def test_grad_mode_is_part_of_the_key():
    layer = lu_linear(3)
    x = torch.randn(2, 3)
    with torch.no_grad():
        y0 = layer(x)
    y1 = layer(x)
    assert not y0.requires_grad and y1.requires_grad


def test_full_batch_training_without_clear_cache_tracks_the_parameters():
    torch.manual_seed(0)
    flow = lu_net(3, num_blocks=2, role="density")
    model = dist.TransformedDistribution(_normal(3), flow)
    data = torch.randn(64, 3) * torch.tensor([2.0, 0.5, 1.0]) + 1.0
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = -model.log_prob(data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_with_cache_shares_parameters():
    layer = lu_linear(3)
    view = layer.with_cache(0)
    assert view is not layer and view._cache_size == 0
    assert view.packed is layer.packed
    x = torch.randn(2, 3)
    assert view(x) is not view(x)


def test_updates_through_data_by_an_optimizer_invalidate_the_caches():
    """Pyro's ClippedAdam writes through ``p.data``, which leaves ``_version`` alone."""
    import pyro.optim

    layer = lu_linear(4, init="orthogonal")
    x = torch.randn(3, 4)
    optim = pyro.optim.ClippedAdam({"lr": 0.1})
    with torch.no_grad():
        before = layer(x)
    layer(torch.randn(3, 4)).sum().backward()
    optim([layer.packed, layer.bias])
    with torch.no_grad():
        after = layer(x)
        expected = x @ layer.weight().T + layer.bias
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)
