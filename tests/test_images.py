"""Image flows: channel and whole-image mixers of every family, the multiscale builder, units."""

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import GeneralizedChannelPermute
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import pyro_lunet
from pyro_lunet import channel_mixer, families, image_flow, image_mixer
from pyro_lunet.image_flows import (
    ActNorm,
    ConvAffineCoupling,
    bits_per_dim,
    dequantize,
    squeeze,
    unit_interval,
    unsqueeze,
)

FAMILIES = families()
F64 = torch.float64


@pytest.fixture(autouse=True)
def _setup(one_thread):
    torch.manual_seed(0)
    pyro.clear_param_store()
    yield


def _perturb(module, scale=0.1):
    """Moves every parameter off its (often identity-like) initial value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _flat_jacobian(fn, x):
    """The (D, D) Jacobian of the flattened map ``x -> fn(x)`` for one event ``x``."""
    shape = x.shape

    def flat(v):
        return fn(v.reshape(shape)).reshape(-1)

    return torch.autograd.functional.jacobian(flat, x.reshape(-1).clone(), vectorize=False)


def _mixer(fam, channels=3, **kw):
    # eval mode: every family exact both ways (SNF's fast side solves with W)
    kw.setdefault("init", "orthogonal")
    m = channel_mixer(channels, fam, cache_size=0, **kw).to(F64)
    _perturb(m, 0.05)
    return m.eval()


# ------------------------------------------------------------ channel mixer
@pytest.mark.parametrize("fam", FAMILIES)
def test_channel_mixer_jacobian_is_kron_and_logdet_matches(fam):
    m = _mixer(fam)
    x = torch.randn(3, 2, 3, dtype=F64)
    J = _flat_jacobian(m, x)
    W = m.weight().detach().contiguous()
    # channels-first flattening: y[c, p] = sum_c' W[c, c'] x[c', p]
    torch.testing.assert_close(J, torch.kron(W, torch.eye(6, dtype=F64)))
    expected = torch.linalg.slogdet(J)[1]
    y = m(x)
    torch.testing.assert_close(m.log_abs_det_jacobian(x, y), expected)
    assert m.log_abs_det_jacobian(x, y).shape == ()
    Jinv = _flat_jacobian(m.inv, y.detach())
    torch.testing.assert_close(Jinv @ J, torch.eye(18, dtype=F64))


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("batch", [(), (2,), (2, 3), (0,)])
def test_channel_mixer_round_trip_and_batch_shapes(fam, batch):
    m = _mixer(fam, channels=4)
    x = torch.randn(*batch, 4, 3, 5, dtype=F64)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(m.inv(y.clone()), x)
    ldj = m.log_abs_det_jacobian(x, y)
    assert ldj.shape == batch
    if x.numel():
        torch.testing.assert_close(ldj, (15 * m.log_abs_det()).expand(batch))
        # the per-pixel map is the vector layer's own
        torch.testing.assert_close(y[..., :, 1, 2], m.layer(x[..., :, 1, 2]))


@pytest.mark.parametrize("fam", FAMILIES)
def test_channel_mixer_refuses_bad_inputs(fam):
    m = channel_mixer(3, fam, height=4, width=5)
    good = torch.randn(2, 3, 4, 5)
    m(good)
    bad = {
        "expects inputs of shape": [
            torch.randn(2, 4, 4, 5),
            torch.randn(3, 5),
            torch.randn(2, 3, 3, 5),
        ],
        "expects dtype": [good.double()],
        "expects device": [torch.empty(2, 3, 4, 5, device="meta")],
        "expects a Tensor": [[1.0, 2.0]],
    }
    for message, inputs in bad.items():
        for x in inputs:
            for call in (m, m.inv):
                with pytest.raises(ValueError, match=message):
                    call(x)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 4, 5\), got \(2, 3, 3, 5\)"):
        m(torch.randn(2, 3, 3, 5))
    with pytest.raises(ValueError, match="channels"):
        channel_mixer(0, fam)
    with pytest.raises(ValueError, match="unknown family"):
        channel_mixer(3, "householder")


@pytest.mark.parametrize("fam", FAMILIES)
def test_channel_mixer_cache_follows_parameter_updates(fam):
    m = channel_mixer(3, fam, init="orthogonal").double()
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    y0 = m(x)
    assert m(x) is y0  # a cached pair
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    (m(x).square().sum() - m.log_abs_det_jacobian(x, m(x)).sum()).backward()
    opt.step()
    y1 = m(x)
    assert not torch.allclose(y1, y0)
    with torch.no_grad():
        fresh = m.layer(x.movedim(-3, -1)).movedim(-1, -3)
    torch.testing.assert_close(y1.detach(), fresh)


def test_snf_channel_mixer_mirrors_vector_sides():
    m = channel_mixer(3, "self_normalizing", init="orthogonal").double()  # role="density"
    with torch.no_grad():
        m.layer.RT.add_(0.01 * torch.randn(3, 3, dtype=F64))  # R no longer exactly W^-1
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    W = m.layer.W.detach()
    # scoring (_inverse) is exact W (x - b) in training mode, sampling applies R
    z = m.inv(x)
    torch.testing.assert_close(z, torch.einsum("ij,...jhw->...ihw", W, x))
    s = m(x)
    torch.testing.assert_close(s, torch.einsum("ij,...jhw->...ihw", m.layer.R.detach(), x))
    m.eval()  # eval: both sides exact
    torch.testing.assert_close(m.inv(m(x).clone()), x)


# --------------------------------------------------------------- image mixer
@pytest.mark.parametrize("fam", FAMILIES)
def test_image_mixer_jacobian_and_round_trip(fam):
    m = image_mixer((2, 2, 3), fam, init="orthogonal", cache_size=0).double()
    _perturb(m, 0.05)
    m.eval()
    x = torch.randn(2, 2, 3, dtype=F64)
    J = _flat_jacobian(m, x)
    torch.testing.assert_close(J, m.weight().detach())
    y = m(x)
    torch.testing.assert_close(m.log_abs_det_jacobian(x, y), torch.linalg.slogdet(J)[1])
    torch.testing.assert_close(m.inv(y), x)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 2, 3\)"):
        m(torch.randn(2, 3, 2))


# --------------------------------------------------------------- the pieces
def test_squeeze_is_a_nested_permutation():
    x = torch.randn(2, 3, 8, 4)
    s = squeeze(x)
    assert s.shape == (2, 12, 4, 2)
    torch.testing.assert_close(unsqueeze(s), x)
    torch.testing.assert_close(s[:, 4:8, 1, 0], x[:, 1, 2:4, 0:2].reshape(2, 4))
    # channel-major: the squeeze of the first k channels is the first 4k channels
    torch.testing.assert_close(squeeze(x[:, :2]), s[:, :8])
    with pytest.raises(ValueError, match="even"):
        squeeze(torch.randn(1, 3, 3))


def test_actnorm_data_dependent_init_and_identity_before():
    norm = ActNorm(3).double()
    x = 3 + 2 * torch.randn(64, 3, 4, 4, dtype=F64)
    norm.eval()
    torch.testing.assert_close(norm.inv(x), x)  # eval mode: no init, identity
    assert not norm.initialized
    norm.train()
    z = norm.inv(x.clone())
    assert norm.initialized
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3, dtype=F64))
    torch.testing.assert_close(
        z.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=F64), rtol=0, atol=1e-5
    )  # std + 1e-6
    loc = norm.loc.detach().clone()
    norm.inv(torch.randn(8, 3, 4, 4, dtype=F64))  # only once
    torch.testing.assert_close(norm.loc.detach(), loc)
    fresh = ActNorm(1)
    fresh.inv(torch.randn(1, 1, 1, 1))  # one value per channel: no init
    assert not fresh.initialized


def test_coupling_starts_at_identity_and_inverts():
    layer = ConvAffineCoupling(5, hidden_channels=6, cache_size=0).double()
    x = torch.randn(3, 5, 4, 4, dtype=F64)
    torch.testing.assert_close(layer(x), x)
    _perturb(layer, 0.3)
    y = layer(x)
    torch.testing.assert_close(layer.inv(y), x)
    J = _flat_jacobian(layer, x[0])
    torch.testing.assert_close(
        layer.log_abs_det_jacobian(x[0], layer(x[0])), torch.linalg.slogdet(J)[1]
    )
    log_scale, _ = layer._scale_shift(x[:, :2])
    assert log_scale.abs().max() <= 2.0


def test_coupling_ldj_cache_follows_parameter_updates():
    layer = ConvAffineCoupling(4, hidden_channels=4).double()
    _perturb(layer, 0.3)
    x = torch.randn(2, 4, 2, 2, dtype=F64)
    y = layer(x)
    ldj = layer.log_abs_det_jacobian(x, y)
    assert layer.log_abs_det_jacobian(x, y) is ldj  # free right after the call
    with torch.no_grad():
        layer.net[-1].weight.mul_(2.0)
    fresh = layer.log_abs_det_jacobian(x, y)
    assert not torch.allclose(fresh, ldj)
    torch.testing.assert_close(fresh, layer.with_cache(0)._forward_ldj(x)[1])


# --------------------------------------------------------------- image flow
def _model(flow, shape):
    base = dist.Normal(torch.zeros(shape, dtype=F64), torch.tensor(1.0, dtype=F64)).to_event(3)
    return dist.TransformedDistribution(base, flow)


def _check_flow_against_brute_force(flow, shape, batch=3):
    flow = flow.double()
    x = torch.randn(batch, *shape, dtype=F64)
    flow.train()
    flow.inv(x)  # initializes the actnorms from data
    _perturb(flow, 0.05)
    flow.eval()
    model = _model(flow, shape)
    lp = model.log_prob(x)
    base = dist.Normal(torch.zeros(shape, dtype=F64), 1.0).to_event(3)
    for i in range(batch):
        J = _flat_jacobian(flow.inv, x[i])
        brute = base.log_prob(flow.inv(x[i].clone())) + torch.linalg.slogdet(J)[1]
        torch.testing.assert_close(lp[i], brute)
    z = flow.inv(x)
    torch.testing.assert_close(flow(z.clone()), x)  # a fresh tensor: no cache hit
    return flow


@pytest.mark.parametrize("fam", FAMILIES)
def test_image_flow_log_prob_matches_brute_force_jacobian(fam):
    flow = image_flow((2, 4, 4), num_levels=2, steps_per_level=1, layer=fam, hidden_channels=4)
    _check_flow_against_brute_force(flow, (2, 4, 4))


@pytest.mark.parametrize("whole", ["butterfly", "circulant"])
def test_image_flow_8x8_with_whole_image_mixer(whole):
    flow = image_flow(
        (1, 8, 8), num_levels=2, steps_per_level=1, layer="lu", hidden_channels=4, image_mixer=whole
    )
    assert sum(isinstance(m, pyro_lunet.ImageMixer) for m in flow.modules()) == 2
    _check_flow_against_brute_force(flow, (1, 8, 8), batch=2)


def test_image_flow_with_pyro_channel_permute():
    flow = image_flow(
        (1, 4, 4),
        num_levels=1,
        steps_per_level=2,
        layer=GeneralizedChannelPermute,
        hidden_channels=4,
    )
    _check_flow_against_brute_force(flow, (1, 4, 4), batch=2)


def test_image_flow_shapes_sampling_float32_and_empty():
    flow = image_flow(
        (3, 8, 8), num_levels=3, steps_per_level=1, layer="circulant", hidden_channels=4
    )
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(3, 8, 8), 1.0).to_event(3), flow)
    x = torch.randn(2, 5, 3, 8, 8)
    lp = model.log_prob(x)
    assert lp.shape == (2, 5) and torch.isfinite(lp).all()
    assert model.sample((4,)).shape == (4, 3, 8, 8)
    empty = torch.randn(0, 3, 8, 8)
    z = flow.inv(empty)
    assert z.shape == (0, 3, 8, 8) and flow(z.clone()).shape == (0, 3, 8, 8)
    assert flow.log_abs_det_jacobian(z, empty).shape == (0,)
    with pytest.raises(ValueError, match="float64"):
        model.log_prob(x.double())
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 8, 8\)"):
        flow.inv(torch.randn(2, 3, 8, 4))


def test_image_flow_refuses_bad_arguments():
    with pytest.raises(ValueError, match="divisible by 4"):
        image_flow((1, 6, 8), num_levels=2)
    with pytest.raises(ValueError, match="num_levels"):
        image_flow((1, 8, 8), num_levels=0)
    with pytest.raises(ValueError, match="shape"):
        image_flow((8, 8))
    with pytest.raises(ValueError, match="role"):
        image_flow((1, 8, 8), role="sampler")


def test_image_flow_first_batch_initializes_actnorms():
    flow = image_flow((1, 8, 8), num_levels=2, steps_per_level=2, hidden_channels=4)
    norms = [m for m in flow.modules() if isinstance(m, ActNorm)]
    assert len(norms) == 4 and not any(bool(n.initialized) for n in norms)
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3), flow)
    model.log_prob(5 + 3 * torch.randn(32, 1, 8, 8))
    assert all(bool(n.initialized) for n in norms)


def _digits(n=256):
    datasets = pytest.importorskip("sklearn.datasets")
    images = torch.as_tensor(datasets.load_digits().images[:n], dtype=torch.float32)
    return images.unsqueeze(1)  # (n, 1, 8, 8), values 0..16


def _density(flow):
    base = dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3)
    return dist.TransformedDistribution(base, [flow, unit_interval()])


@pytest.mark.parametrize("fam", FAMILIES)
def test_adam_steps_reduce_nll_on_digits(fam):
    data = _digits()
    flow = image_flow((1, 8, 8), num_levels=2, steps_per_level=1, layer=fam, hidden_channels=8)
    model = _density(flow)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    fixed = dequantize(data, 17, generator=gen)
    with torch.no_grad():
        flow.train()
        model.log_prob(fixed)  # initializes the actnorms
        flow.eval()
        before = -model.log_prob(fixed).mean()
    flow.train()
    for _ in range(25):
        opt.zero_grad()
        loss = -model.log_prob(dequantize(data, 17, generator=gen)).mean()
        loss.backward()
        opt.step()
    flow.eval()
    with torch.no_grad():
        after = -model.log_prob(fixed).mean()
    assert torch.isfinite(after) and after < before - 5.0, (before, after)


def test_svi_reduces_nll_and_state_dict_round_trip():
    data = dequantize(_digits(128), 17, generator=torch.Generator().manual_seed(1))
    flow = image_flow(
        (1, 8, 8), num_levels=2, steps_per_level=1, layer="butterfly", hidden_channels=8
    )
    density = _density(flow)

    def model(x):
        pyro.module("flow", flow)
        with pyro.plate("images", x.shape[0]):
            pyro.sample("x", density, obs=x)

    def guide(x):
        pass

    svi = SVI(model, guide, Adam({"lr": 3e-3}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(30)]
    assert losses[-1] < losses[0] - 5.0 * len(data)

    flow.eval()
    with torch.no_grad():
        lp = density.log_prob(data)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    fresh = image_flow(
        (1, 8, 8), num_levels=2, steps_per_level=1, layer="butterfly", hidden_channels=8
    )
    fresh.load_state_dict(torch.load(buffer))
    assert all(bool(m.initialized) for m in fresh.modules() if isinstance(m, ActNorm))
    fresh.train()  # training mode: a not-initialized actnorm would re-initialize here
    with torch.no_grad():
        lp_fresh = _density(fresh).log_prob(data)
    fresh.eval()
    torch.testing.assert_close(lp_fresh, lp, rtol=1e-5, atol=1e-4)


def test_penalty_reaches_snf_mixers_inside_image_flow():
    flow = image_flow(
        (1, 4, 4), num_levels=1, steps_per_level=2, layer="self_normalizing", hidden_channels=4
    )
    value = pyro_lunet.penalty(flow)
    assert value.shape == () and torch.isfinite(value)


# -------------------------------------------------------------------- units
def test_bits_per_dim_of_a_uniform_model_is_log2_levels():
    levels, shape = 17, (1, 8, 8)
    uniform = dist.Uniform(torch.zeros(shape), torch.ones(shape)).to_event(3)
    u = dequantize(torch.randint(0, levels, (10, *shape)).float(), levels)
    assert (u >= 0).all() and (u < 1).all()
    bpd = bits_per_dim(uniform.log_prob(u), 64, levels)
    torch.testing.assert_close(bpd, torch.full((10,), math.log2(levels)))
    # a density twice as high everywhere saves exactly one bit per 64 dims
    torch.testing.assert_close(
        bits_per_dim(torch.tensor(math.log(2.0)), 64, 256), torch.tensor(8 - 1 / 64)
    )


def test_unit_interval_log_det_is_counted():
    t = unit_interval(0.05)
    v = torch.randn(7, dtype=F64, requires_grad=True)
    u = t(v)
    assert ((u > 0) & (u < 1)).all()
    (grad,) = torch.autograd.grad(u.sum(), v)
    torch.testing.assert_close(t.log_abs_det_jacobian(v, u), grad.log())
    torch.testing.assert_close(t.inv(u), v)


@pytest.mark.parametrize("fam", FAMILIES)
def test_log_prob_runs_each_network_once(fam):
    # A chain's log-det reuses each level's cached pair; a miss would rerun the
    # sampling direction (SNF's approximate side in training mode).
    flow = image_flow((1, 8, 8), num_levels=2, steps_per_level=2, layer=fam, hidden_channels=4)
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3), flow)
    x = torch.randn(6, 1, 8, 8)
    model.log_prob(x)  # initializes the actnorms (their first call recomputes once)
    calls = []
    couplings = [m for m in flow.modules() if isinstance(m, ConvAffineCoupling)]
    for m in couplings:
        m.net.register_forward_hook(lambda *args: calls.append(1))
    model.log_prob(x.clone()).sum().backward()
    assert len(calls) == len(couplings) == 5


def test_docstring_examples():
    import doctest
    import importlib

    # (the package's ``channel_mixer`` attribute is the factory, not the module)
    for name in ("pyro_lunet.image_flows", "pyro_lunet.transforms.channel_mixer"):
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0


def test_snf_image_flow_training_log_prob_matches_eval():
    # density role: scoring is W exactly; only the tracked log-det differs from eval's
    data = dequantize(_digits(128), 17, generator=torch.Generator().manual_seed(2))
    flow = image_flow(
        (1, 8, 8), num_levels=2, steps_per_level=1, layer="self_normalizing", hidden_channels=8
    )
    model = _density(flow)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        (-model.log_prob(data).mean()).backward()
        opt.step()
    with torch.no_grad():
        train_mode = model.log_prob(data)
        flow.eval()
        eval_mode = model.log_prob(data)
    torch.testing.assert_close(train_mode, eval_mode, rtol=0, atol=0.5)
    layers = [m for m in flow.modules() if isinstance(m, pyro_lunet.SelfNormalizingLinear)]
    for layer in layers:
        assert (layer.R @ layer.W - torch.eye(layer.input_dim)).abs().max() < 0.1


@pytest.mark.parametrize("fam", ["lu", "self_normalizing", "rank_one"])
def test_used_image_flow_pickles_and_deep_copies(fam):
    import copy
    import pickle

    flow = image_flow((1, 4, 4), num_levels=1, steps_per_level=2, layer=fam, hidden_channels=4)
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 4, 4), 1.0).to_event(3), flow)
    x = torch.randn(8, 1, 4, 4)
    model.log_prob(x).sum().backward()  # caches now hold graphs
    flow.eval()
    with torch.no_grad():
        expected = model.log_prob(x.clone())
    for clone in (copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        other = dist.TransformedDistribution(model.base_dist, clone)
        with torch.no_grad():
            torch.testing.assert_close(other.log_prob(x.clone()), expected)


def test_image_flow_parts_run_in_a_fused_flow():
    # After the fused ``Flow`` lands (pyro_lunet.transforms.flow), the image parts
    # run inside it through ``_apply_with_log_det``; skipped where it does not exist.
    flow_module = pytest.importorskip("pyro_lunet.transforms.flow")
    chain = image_flow((1, 8, 8), num_levels=2, steps_per_level=1, layer="lu", hidden_channels=4)
    x = torch.randn(5, 1, 8, 8)
    chain.inv(x)  # initializes the actnorms
    _perturb(chain, 0.05)
    fused = flow_module.Flow(list(chain), event_dim=3)
    base = dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3)
    expected = dist.TransformedDistribution(base, chain).log_prob(x.clone())
    torch.testing.assert_close(
        dist.TransformedDistribution(base, fused).log_prob(x.clone()), expected
    )
    torch.testing.assert_close(fused(fused.inv(x).clone()), x, rtol=1e-4, atol=1e-4)


def test_cli_fits_and_reloads_an_image_flow(tmp_path, monkeypatch, capsys):
    """``pyro-lunet fit digits --flow image:FAMILY``: samples.png, and a checkpoint that scores
    the same after loading."""
    from pyro_lunet.cli.checkpoint import load_model
    from pyro_lunet.cli.main import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = ["fit", "digits", "--flow", "image:butterfly", "--rows", "300", "--epochs", "1"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert (out / "samples.png").is_file()
    model, config = load_model(out)
    assert config.image_shape == [8, 8] and config.flow == "image:butterfly"
    rows = torch.rand(5, 64) * 16
    reloaded = load_model(out)[0].log_prob(rows)
    torch.testing.assert_close(model.log_prob(rows), reloaded)
    assert main(["fit", "moons", "--flow", "image:lu", "--out", str(tmp_path / "x")]) == 2
    assert "needs rows that are images" in capsys.readouterr().err


# ------------------------------------------------ command line: discrete images
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One short ``pyro-lunet fit digits --flow image:lu`` (discrete: 17 levels) run."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from pyro_lunet.cli.main import main

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("digits") / "run"
    args = ["fit", "digits", "--flow", "image:lu", "--blocks", "1", "--epochs", "2"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    return out


def test_cli_discrete_bits_per_dim_match_an_independent_computation(digits_run):
    """metrics.json's ``bits_per_dim_discrete`` equals bits_per_dim of the saved flow,
    rebuilt by hand in the unit cube (flow, then unit_interval; no scaling by L), on the
    same noise; and the one-draw NLL in nats bounds the same quantity."""
    import json

    from pyro_lunet.cli.checkpoint import UNIT_INTERVAL_ALPHA, load_model
    from pyro_lunet.datasets import digits
    from pyro_lunet.training import train_val_split

    metrics = json.loads((digits_run / "metrics.json").read_text())
    d = metrics["bits_per_dim_discrete"]
    assert (d["levels"], d["dim"], d["noise_draws"]) == (17, 64, 4)
    model, config = load_model(digits_run)
    assert config.levels == 17
    flow = model.transforms[0]
    cube = dist.transforms.IndependentTransform(unit_interval(UNIT_INTERVAL_ALPHA), 1)
    unit_model = dist.TransformedDistribution(dist.Normal(torch.zeros(64), 1.0).to_event(1),
                                              [flow, cube])  # fmt: skip
    _, val, _, _ = train_val_split(digits(dequantize=False), 0.1, seed=0)
    gen = torch.Generator().manual_seed(d["noise_seed"])
    with torch.no_grad():
        draws = [bits_per_dim(unit_model.log_prob(dequantize(val, 17, gen)), 64, 17)
                 for _ in range(d["noise_draws"])]  # fmt: skip
    expected = torch.stack(draws).double().mean().item()
    assert d["val"] == pytest.approx(expected, abs=1e-5)
    # fit_density's held-out NLL (one fixed draw) in bits/dim: the same bound, other noise
    assert metrics["val_nll"]["bits_per_dim"] == pytest.approx(d["val"], abs=0.05)
    assert 0 < d["val"] < math.log2(17) + 0.5  # trained: near or below a uniform model


def test_discrete_bits_per_dim_of_a_uniform_model_is_log2_levels():
    # a density uniform on [0, L)^D in the data's units: -log2 P(x) / D = log2 L exactly
    from pyro_lunet.cli.commands import discrete_bits_per_dim

    levels, dim = 17, 64
    uniform = dist.TransformedDistribution(
        dist.Uniform(torch.zeros(dim), torch.full((dim,), float(levels))).to_event(1), []
    )
    rows = torch.randint(0, levels, (10, dim)).float()
    bpd = discrete_bits_per_dim(uniform, rows, levels, draws=3)
    torch.testing.assert_close(bpd, torch.full((10,), math.log2(levels), dtype=F64))


def test_cli_samples_and_scores_of_discrete_images_are_in_the_data_units(digits_run, tmp_path):
    import numpy as np

    from pyro_lunet.cli.main import main

    out = tmp_path / "samples.npy"
    assert main(["sample", str(digits_run), "-n", "50", "-o", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (50, 64)
    assert (samples == samples.round()).all() and samples.min() >= 0 and samples.max() <= 16
    scores = tmp_path / "scores.npy"
    assert main(["score", str(digits_run), str(out), "-o", str(scores)]) == 0
    log_p = np.load(scores)
    assert log_p.shape == (50,) and np.isfinite(log_p).all()


def test_cli_refuses_wrong_levels(tmp_path, capsys):
    import numpy as np

    from pyro_lunet.cli.main import main

    def error(*args):
        assert main(["fit", *map(str, args), "--out", str(tmp_path / "x"), "--quiet"]) == 2
        return capsys.readouterr().err

    pytest.importorskip("sklearn")
    assert "13 is not an integer in 0..9; --levels 10 takes integer levels 0..9" in error(
        "digits", "--flow", "image:lu", "--levels", 10
    )
    images = np.random.default_rng(0).integers(0, 4, size=(40, 4, 4)).astype(float)
    images[3, 1, 2] = 2.5
    np.save(tmp_path / "images.npy", images)
    message = error(tmp_path / "images.npy", "--flow", "image:lu", "--levels", 4)
    assert "row 4, column 7: 2.5 is not an integer in 0..3" in message
    assert "--levels is for image flows" in error("digits", "--flow", "coupling:lu", "--levels", 17)
    with pytest.raises(SystemExit):
        main(["fit", "digits", "--flow", "image:lu", "--levels", "1"])
    assert "at least 2, got 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_fits_a_file_of_integer_images_with_levels(tmp_path):
    import json

    import numpy as np

    pytest.importorskip("matplotlib")
    from pyro_lunet.cli.main import main

    images = np.random.default_rng(0).integers(0, 4, size=(60, 4, 4)).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "run"
    args = ["fit", str(tmp_path / "images.npy"), "--flow", "image:circulant", "--levels", "4"]
    assert main([*args, "--blocks", "1", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    d = json.loads((out / "metrics.json").read_text())["bits_per_dim_discrete"]
    assert d["levels"] == 4 and d["dim"] == 16
    # near the uniform model's log2 4 = 2 bits after one epoch: the right units
    assert 1.0 < d["val"] < 3.0
    assert main(["sample", str(out), "-n", "20", "-o", str(tmp_path / "s.npy")]) == 0
    samples = np.load(tmp_path / "s.npy")
    assert set(np.unique(samples)) <= {0.0, 1.0, 2.0, 3.0}
