"""Training helpers: fit_density and its steps, Maintenance, PenalizedELBO with SVI and torch
loops."""

from __future__ import annotations

import copy
import logging
import warnings
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

import pyro_lunet
import pyro_lunet.training
from pyro_lunet import (
    Maintenance,
    PenalizedELBO,
    RankOneScheduler,
    RankOneUpdatedLinear,
    SelfNormalizingLinear,
    activation_flow,
    coupling_flow,
    fit_density,
    penalty,
    train_epoch,
    train_val_split,
)
from pyro_lunet.fingerprint import parameter_fingerprint

logging.getLogger("pyro").setLevel(logging.WARNING)
MIX = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.5, 0.3, 0.4]], dtype=torch.float64)


def gaussian_rows(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64) @ MIX.T + torch.tensor(
        [1.0, -1.0, 0.5], dtype=torch.float64
    )


def _split(data, val_fraction, seed):
    """The split fit_density makes (same generator use)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=gen)
    num_val = max(1, int(round(val_fraction * data.shape[0])))
    return data[order[num_val:]], data[order[:num_val]]


def test_fit_density_history_checkpoint_and_progress(capsys):
    torch.manual_seed(0)
    data = gaussian_rows(600)
    flow = activation_flow(3, 1, layer="lu", role="density").to(torch.float64)
    result = fit_density(flow, data, epochs=4, batch_size=100, lr=2e-2, val_fraction=0.2)
    hist = result.history
    assert len(hist["train_nll"]) == len(hist["val_nll"]) == 4
    assert result.best_val_nll == min(hist["val_nll"])
    assert result.best_epoch == hist["val_nll"].index(result.best_val_nll)
    assert hist["train_nll"][-1] < hist["train_nll"][0]
    # The returned model holds the best checkpoint, in eval mode.
    assert not flow.training
    _, val = _split(data, 0.2, 0)
    with torch.no_grad():
        val_nll = -result.model.log_prob(val).mean().item()
    assert val_nll == pytest.approx(result.best_val_nll, abs=1e-10)
    err = capsys.readouterr().err
    assert "train NLL" in err and "val NLL" in err and "epoch 4/4" in err


def test_fit_density_dequantizes_every_batch_afresh_and_the_held_out_rows_once():
    """Integer rows with a constant column are fitted through ``dequantize``: fresh noise
    for every training batch (never the same rows twice), one fixed draw for validation."""
    torch.manual_seed(0)
    data = torch.randint(0, 4, (200, 3)).double()
    data[:, 2] = 0.0  # constant without the noise: refused unless it is dequantized
    seen = []

    def noise(rows, generator):
        out = rows + torch.rand(rows.shape, dtype=rows.dtype, generator=generator)
        seen.append(out)
        return out

    flow = activation_flow(3, 1, layer="lu", role="density").to(torch.float64)
    with pytest.raises(ValueError, match="constant"):
        fit_density(flow, data, epochs=1, progress=False)
    result = fit_density(flow, data, epochs=3, batch_size=60, val_fraction=0.2, lr=1e-2,
                         seed=1, progress=False, dequantize=noise)  # fmt: skip
    val, checked, batches = seen[0], seen[1], seen[2:]
    assert len(val) == 40 and len(checked) == 160 and len(batches) == 3 * 3
    assert all(((b >= 0) & (b < 4) & (b != b.floor())).all() for b in batches)
    assert len({b.sum().item() for b in batches}) == len(batches)  # fresh noise each step
    with torch.no_grad():  # the best epoch was scored on the one held-out draw
        assert -result.model.log_prob(val).mean().item() == pytest.approx(result.best_val_nll)


def test_fit_density_checks_inputs():
    flow = activation_flow(3, 0, role="density")  # float32
    with pytest.raises(ValueError, match="device and dtype"):
        fit_density(flow, gaussian_rows(50), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fit_density(flow, torch.zeros(5), epochs=1, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        fit_density(flow, torch.zeros(5, 3), val_fraction=1.0, progress=False)


@pytest.mark.slow
def test_fit_density_merges_rank_one_layers_to_the_mle():
    """A single layer's maximum-likelihood fit is the sample mean and covariance.

    A rank-one-updated layer gets there only through merges (``u v^T`` alone
    is rank one), which fit_density must run unasked.
    """
    torch.manual_seed(0)
    data = gaussian_rows(2000)
    flow = activation_flow(3, 0, layer="rank_one", role="density").to(torch.float64)
    result = fit_density(flow, data, epochs=40, batch_size=200, lr=2e-2, progress=False)
    layer = flow.parts[0]
    train, _ = _split(data, 0.1, 0)
    w = layer.weight().detach()
    assert not torch.allclose(layer.A, torch.eye(3, dtype=layer.A.dtype))  # merged
    assert torch.allclose(layer.bias.detach(), train.mean(0), atol=0.05)
    assert torch.allclose(w @ w.T, torch.cov(train.T, correction=0), atol=0.1)
    assert result.best_val_nll < result.history["val_nll"][0] - 1.0


def test_fit_density_adds_the_self_normalizing_penalty():
    torch.manual_seed(0)
    flow = activation_flow(3, 1, layer="self_normalizing", role="density").to(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SNF warns when a backward misses its penalty
        fit_density(flow, gaussian_rows(400), epochs=2, batch_size=100, lr=1e-3, progress=False)
    for layer in (flow.parts[0], flow.parts[2]):
        assert torch.allclose(layer.R @ layer.W, torch.eye(3, dtype=layer.W.dtype), atol=1e-2)


# ------------------------------------------------------------------------ SVI
def model3():
    pyro.sample(
        "z", dist.MultivariateNormal(torch.tensor([1.0, -1.0, 0.5]), MIX.float() @ MIX.float().T)
    )


def test_penalized_elbo_adds_every_penalty():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormalizingFlow(
        model3, partial(activation_flow, num_blocks=1, layer="self_normalizing")
    )
    optim = pyro.optim.Adam({"lr": 1e-2})
    elbo = PenalizedELBO(Trace_ELBO(num_particles=4, vectorize_particles=True), optim)
    svi = SVI(model3, guide, optim, elbo)
    for _ in range(5):
        svi.step()
    pyro.set_rng_seed(1)
    total = elbo.differentiable_loss(model3, guide)
    extra = penalty(guide)
    pyro.set_rng_seed(1)
    bare = elbo.elbo.differentiable_loss(model3, guide)  # the wrapped ELBO alone
    assert extra.item() > 0
    assert total.item() == pytest.approx(bare.item() + extra.item(), rel=1e-5)
    assert elbo.num_particles == 4  # settings read through


def _rank_one_guide():
    return AutoNormalizingFlow(model3, partial(activation_flow, num_blocks=0, layer="rank_one"))


# ClippedAdam writes through ``p.data``, which leaves ``_version`` unchanged.
@pytest.mark.parametrize("optim_class", [pyro.optim.Adam, pyro.optim.ClippedAdam])
def test_penalized_elbo_runs_maintenance_once_per_svi_step(optim_class):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = _rank_one_guide()
    optim = optim_class({"lr": 2e-2})
    elbo = PenalizedELBO(
        Trace_ELBO(num_particles=4, vectorize_particles=True), optim, merge_every=5
    )
    svi = SVI(model3, guide, optim, elbo)
    for _ in range(21):
        svi.step()
    scheduler = elbo.maintenance.schedulers[0]
    # Step k's maintenance runs before step k+1's gradient: 20 of 21 so far.
    assert scheduler.num_steps == 20 and scheduler.num_rounds == 4
    layer = guide.transform.parts[0]
    assert isinstance(layer, RankOneUpdatedLinear)
    assert not torch.allclose(layer.A, torch.eye(3))  # merges happened
    svi.evaluate_loss()  # no gradient, no maintenance
    assert scheduler.num_steps == 20


@pytest.mark.slow
def test_penalized_elbo_in_a_torch_loop_fits_the_gaussian():
    """Pyro's ``elbo(model, guide)`` module with a torch optimizer: merges reset v's moments."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = _rank_one_guide()
    loss_fn = PenalizedELBO(Trace_ELBO(num_particles=8, vectorize_particles=True))(model3, guide)
    loss_fn()  # builds the guide's parameters
    opt = torch.optim.Adam(loss_fn.parameters(), lr=2e-2)
    loss_fn.elbo.set_optimizer(opt)
    for _ in range(500):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    layer = guide.transform.parts[0].eval()
    scheduler = loss_fn.elbo.maintenance.schedulers[0]
    assert scheduler.num_steps == 499 and scheduler.optimizer is opt
    w = layer.weight().detach()
    target = MIX.float() @ MIX.float().T
    # 500 noisy steps leave about 0.1-0.25 per entry to go (seed to seed), but
    # the correlations are there: u v^T alone (no merges) is rank one.
    error = torch.linalg.matrix_norm(w @ w.T - target)
    assert error < 0.4 * torch.linalg.matrix_norm(torch.eye(3) - target)
    assert torch.allclose(layer.bias.detach(), torch.tensor([1.0, -1.0, 0.5]), atol=0.15)


def test_maintenance_in_a_plain_loop_and_checkpoint():
    torch.manual_seed(0)
    flow = coupling_flow(3, 1, layer="rank_one", role="density")
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    maintenance = Maintenance(flow, opt, merge_every=2)
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), flow)
    data = gaussian_rows(64).float()
    for _ in range(4):
        loss = -model.log_prob(data).mean() + penalty(flow)
        opt.zero_grad()
        loss.backward()
        opt.step()
        maintenance.step()
    assert maintenance.state_dict() == {"schedulers": [{"num_steps": 4, "num_rounds": 2}]}
    fresh = Maintenance(flow, opt)
    fresh.load_state_dict(maintenance.state_dict())
    assert fresh.schedulers[0].num_rounds == 2


def test_penalty_of_several_modules_counts_each_layer_once():
    layer = SelfNormalizingLinear(3).train()
    layer(torch.randn(4, 3, requires_grad=True))
    layer.inv(torch.randn(4, 3))  # exact side: records the reconstruction input
    value = layer.penalty()
    assert torch.allclose(penalty([layer, torch.nn.ModuleList([layer])]), value)
    assert penalty(torch.nn.Linear(2, 2)).item() == 0.0
    with pytest.raises(ValueError, match="torch.nn.Module"):
        penalty([layer, "x"])


def test_fit_density_names_a_divergence():
    torch.manual_seed(0)
    flow = activation_flow(2, num_blocks=1, role="density")
    data = torch.randn(200, 2)
    with pytest.raises(FloatingPointError, match="diverged in epoch 1.*smaller learning rate"):
        fit_density(flow, data, epochs=2, lr=1e30, progress=False)


# ------------------------------------------------------------- named steps
def test_train_val_split_is_fit_densitys_split():
    data = gaussian_rows(50)
    train, val, train_index, val_index = train_val_split(data, 0.2, seed=3)
    expected_train, expected_val = _split(data, 0.2, 3)
    assert torch.equal(train, expected_train) and torch.equal(val, expected_val)
    assert torch.equal(data[train_index], train) and torch.equal(data[val_index], val)
    flow = activation_flow(3, 0, role="density").to(torch.float64)
    result = fit_density(flow, data, epochs=1, val_fraction=0.2, seed=3, progress=False)
    assert torch.equal(result.split[0], train_index) and torch.equal(result.split[1], val_index)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(data, 0.0)
    with pytest.raises(ValueError, match="held-out split"):
        train_val_split(data[:1], 0.5)


def test_train_epoch_is_one_epoch_of_fit_density():
    data = gaussian_rows(120)
    torch.manual_seed(0)
    flow = activation_flow(3, 1, layer="rank_one", role="density").to(torch.float64)
    twin = copy.deepcopy(flow)
    result = fit_density(flow, data, epochs=1, batch_size=40, lr=1e-2, progress=False)
    # The same epoch by hand: the split's generator then draws the batch order.
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=gen)
    train = data[order[12:]]
    perm = torch.randperm(len(train), generator=gen)
    model = dist.TransformedDistribution(
        dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1), twin
    )
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    seen = []
    nll = train_epoch(model, train[perm].split(40), opt, Maintenance(twin, opt), seen.append)
    assert nll == pytest.approx(result.history["train_nll"][0], rel=1e-12)
    assert len(seen) == 3 and seen[-1].item() == pytest.approx(nll, rel=1e-12)
    with pytest.raises(ValueError, match="at least one batch"):
        train_epoch(model, [], opt)


# ---------------------------------------------------------- discovered hooks
class _Counting(torch.nn.Module):
    """A layer that takes part in Maintenance by defining the hooks."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.rounds, self.claimed_by = [], None

    def maintenance_round(self, force, correct_steps, recompute_log_det):
        self.rounds.append((force, correct_steps, recompute_log_det))
        return [(self.weight, torch.tensor(force))]

    def maintenance_claim(self, scheduler):
        self.claimed_by = scheduler


def test_maintenance_discovers_layers_by_their_hooks():
    layer = _Counting()
    tree = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([layer, layer]))
    opt = torch.optim.SGD(tree.parameters(), lr=0.1, momentum=0.9)
    tree[0](torch.ones(1, 2)).sum().add(layer.weight.sum()).backward()
    opt.step()
    maintenance = Maintenance(tree, opt, merge_every=2, force_every=2, correct_every=3,
                              correct_steps=4, recompute_log_det_every=None)  # fmt: skip
    assert maintenance.layers() == [layer]
    maintenance.step()
    assert layer.claimed_by is maintenance and layer.rounds == []
    for _ in range(5):
        maintenance.step()
    assert layer.rounds == [(False, 0, False), (True, 0, False), (False, 4, False)]
    assert layer.weight not in opt.state  # dropped when the forced round flagged it
    assert all(p in opt.state for p in tree[0].parameters())
    assert maintenance.schedulers == [maintenance]  # the old spelling still reads


def test_rank_one_scheduler_is_a_maintenance_of_rank_one_layers_only():
    layer = _Counting()
    rank_one = RankOneUpdatedLinear(3)
    tree = torch.nn.ModuleList([layer, rank_one])
    scheduler = RankOneScheduler(tree, None, merge_every=1)
    assert isinstance(scheduler, Maintenance)
    assert scheduler.layers() == [rank_one]
    scheduler.step()
    assert layer.rounds == [] and scheduler.state_dict() == {"num_steps": 1, "num_rounds": 1}
    assert Maintenance(tree).layers() == [layer, rank_one]


def test_training_module_exports_no_command_line_helpers():
    for name in ("held_out_count", "log_prob_in_chunks", "mean_nll", "standard_normal"):
        assert name not in pyro_lunet.training.__all__
        assert name not in pyro_lunet.__all__
    assert {"train_epoch", "train_val_split"} <= set(pyro_lunet.__all__)


def test_parameter_fingerprint_sees_in_place_writes_and_new_storage():
    p = torch.nn.Parameter(torch.zeros(3))
    key = parameter_fingerprint([p])
    assert parameter_fingerprint([p]) == key
    with torch.no_grad():
        p.add_(1.0)
    assert parameter_fingerprint([p]) != key
    key = parameter_fingerprint([p], requires_grad=True)
    p.requires_grad_(False)
    assert parameter_fingerprint([p], requires_grad=True) != key
    assert len(parameter_fingerprint([p, p])) == 2


def test_fit_density_progress_off_a_terminal_is_one_line_per_epoch(capsys):
    """A log or CI file gets one plain line per epoch (tqdm's format, no carriage returns)."""
    data = gaussian_rows(300)
    flow = activation_flow(3, 1, layer="lu", role="density").to(torch.float64)
    fit_density(flow, data, epochs=3, batch_size=50, lr=1e-2)
    lines = capsys.readouterr().err.splitlines(keepends=True)
    assert len(lines) == 3 and not any("\r" in line for line in lines)
    for epoch, line in enumerate(lines, 1):
        assert line.startswith(f"epoch {epoch}/3 |") and "train NLL" in line
        assert "val NLL" in line and line.endswith("nats]\n")
    fit_density(flow, data, epochs=2, batch_size=50, lr=1e-2, progress=False)
    assert capsys.readouterr().err == ""


def test_fit_density_progress_on_a_terminal_is_a_live_tqdm_bar(monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    flow = activation_flow(3, 1, layer="lu", role="density").to(torch.float64)
    fit_density(flow, gaussian_rows(300), epochs=3, batch_size=50, lr=1e-2)
    shown = sys.stderr.getvalue()
    assert "\r" in shown and "epoch 3/3" in shown and "train NLL" in shown
    assert shown.endswith("\n")  # the bar ends its line
