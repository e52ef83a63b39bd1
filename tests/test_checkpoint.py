"""Checkpoints rebuild every flow the command line can fit, exactly."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_lunet._scoring import standard_normal
from pyro_lunet.cli.checkpoint import (
    CheckpointError,
    ModelConfig,
    build_model,
    flow_names,
    load_model,
    parse_flow,
    save_model,
)

MEAN, SCALE = [0.5, -1.0, 2.0], [2.0, 0.5, 3.0]


def _trained_model(spec: str):
    torch.manual_seed(0)
    if spec.startswith("image:"):  # rows that are 2 x 2 images
        config = ModelConfig(flow=spec, blocks=2, input_dim=4, mean=[*MEAN, 0.0],
                             scale=[*SCALE, 1.0], image_shape=[2, 2])  # fmt: skip
    else:
        config = ModelConfig(flow=spec, blocks=2, input_dim=3, mean=MEAN, scale=SCALE)
    model, flow = build_model(config)
    with torch.no_grad():  # away from the initialization, as training leaves it
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for layer in flow.modules():
        if hasattr(layer, "merge_"):  # rank-one: buffers A, A^-1 change too
            layer.merge_(force=True)
    flow.eval()
    return model, flow, config


@pytest.mark.parametrize("spec", flow_names())
def test_every_flow_rebuilds_bit_for_bit(spec, tmp_path):
    model, flow, config = _trained_model(spec)
    save_model(tmp_path, flow, config)
    loaded, loaded_config = load_model(tmp_path / "model.pt")  # a file inside works too
    assert loaded_config == config
    x = torch.randn(16, config.input_dim) * torch.tensor(config.scale) + torch.tensor(config.mean)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), model.log_prob(x))
        torch.manual_seed(1)
        expected = model.sample((8,))
        torch.manual_seed(1)
        assert torch.equal(loaded.sample((8,)), expected)


def test_discrete_image_model_rebuilds_and_lives_on_the_levels(tmp_path):
    """A discrete-image config (levels L): y = L * unit_interval(flow(z)), rebuilt bit for
    bit; samples fall in [0, L) up to the logit map's margin."""
    from pyro_lunet.cli.checkpoint import discrete_config

    torch.manual_seed(0)
    config = ModelConfig(flow="image:circulant", blocks=1, input_dim=4, image_shape=[2, 2],
                         levels=5, **discrete_config(5, 4))  # fmt: skip
    model, flow = build_model(config)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flow.eval()
    save_model(tmp_path, flow, config)
    loaded, loaded_config = load_model(tmp_path)
    assert loaded_config == config
    y = torch.randint(0, 5, (16, 4)).float() + torch.rand(16, 4)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(y), model.log_prob(y))
        samples = loaded.sample((2000,))
    margin = 5 * 0.05 / 0.9  # unit_interval(0.05) reaches alpha / (1 - 2 alpha) past the cube
    assert samples.min() > -margin and samples.max() < 5 + margin
    with pytest.raises(CheckpointError, match="levels=5 is for image flows"):
        build_model(ModelConfig(flow="coupling:lu", blocks=1, input_dim=4, levels=5,
                                **discrete_config(5, 4)))  # fmt: skip


def test_log_densities_are_in_the_data_units():
    model, flow, _ = _trained_model("coupling:circulant")
    x = torch.randn(16, 3, dtype=torch.float64).float()
    standardized = dist.TransformedDistribution(standard_normal(3, x), flow)
    mean, scale = torch.tensor(MEAN), torch.tensor(SCALE)
    with torch.no_grad():
        expected = standardized.log_prob((x - mean) / scale) - scale.log().sum()
        torch.testing.assert_close(model.log_prob(x), expected)


def test_float64_and_config_round_trip(tmp_path):
    config = ModelConfig(flow="activation:butterfly", blocks=1, input_dim=2, mean=[0.1, 1 / 3],
                         scale=[math.pi, 1e-7], dtype="float64")  # fmt: skip
    _, flow = build_model(config)
    assert all(p.dtype == torch.float64 for p in flow.parameters())
    save_model(tmp_path, flow, config)
    model, loaded = load_model(tmp_path)
    assert loaded.mean == config.mean and loaded.scale == config.scale  # floats exact in JSON
    assert model.log_prob(torch.zeros(2, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("spec", ["coupling:rank-one", "coupling:rank_one", "spline", "lu-net"])
def test_flow_names_accept_hyphens_and_bare_builders(spec):
    builder, family = parse_flow(spec)
    assert family in ("rank_one", "lu") and builder in ("coupling", "spline", "lu-net")


@pytest.mark.parametrize("spec", ["", "glow", "coupling:dense", "lu-net:butterfly", "lu:coupling"])
def test_unknown_flows_list_the_valid_ones(spec):
    with pytest.raises(CheckpointError, match="expected lu-net or BUILDER:FAMILY"):
        parse_flow(spec)


def test_newer_checkpoint_format_is_refused(tmp_path):
    _, flow, config = _trained_model("lu-net")
    config.format = 99
    save_model(tmp_path, flow, config)
    with pytest.raises(CheckpointError, match="format 99"):
        load_model(tmp_path)


def test_a_checkpoint_written_before_the_cli_package_still_loads():
    """``tests/data/checkpoint_v1`` was written by ``pyro-lunet fit`` when the command line
    was ``pyro_lunet/cli.py`` and ``pyro_lunet/checkpoint.py``; it loads and scores as then."""
    import json
    from pathlib import Path

    data = Path(__file__).parent / "data"
    expected = json.loads((data / "checkpoint_v1_expected.json").read_text())
    model, config = load_model(data / "checkpoint_v1")
    assert config.flow == "spline:butterfly" and config.format == 1
    with torch.no_grad():
        log_prob = model.log_prob(torch.tensor(expected["rows"]))
    torch.testing.assert_close(
        log_prob, torch.tensor(expected["log_prob"]), rtol=1e-5, atol=1e-5
    )  # float32, any CPU
