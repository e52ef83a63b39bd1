"""fit_density never loses the user's work: failures restore the best state, bad data is refused."""

from __future__ import annotations

import contextlib
import copy
import sys

import pyro
import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from pyro_lunet import activation_flow, fit_density

# 180 training rows in batches of 60: three optimizer steps an epoch.
FIT = {"batch_size": 60, "lr": 2e-2, "seed": 0, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(dim: int = 2) -> torch.Tensor:
    return torch.randn(200, dim, generator=torch.Generator().manual_seed(1))


def _flow(dim: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return activation_flow(dim, 1, role="density")


def _state(flow: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in flow.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def _at_step(n: int, action, after: bool = False):
    """Calls ``action(optimizer)`` just before (or ``after``) the ``n``-th optimizer step."""
    count = 0

    def hook(optimizer, args, kwargs):
        nonlocal count
        count += 1
        if count == n:
            action(optimizer)

    register = register_optimizer_step_post_hook if after else register_optimizer_step_pre_hook
    handle = register(hook)
    try:
        yield
    finally:
        handle.remove()


def _notes(error: BaseException) -> str:
    return " ".join(getattr(error, "__notes__", []))


def _best_of_two_epochs(flow: torch.nn.Module):
    """What an identical fit keeps after epochs 1-2: the best state those epochs reach."""
    reference = copy.deepcopy(flow)
    return reference, fit_density(reference, _data(), epochs=2, **FIT)


def test_a_divergence_after_pretraining_restores_the_pretrained_flow():
    flow = _flow()
    fit_density(flow, _data(), epochs=3, **FIT)
    pretrained = _state(flow)
    message = r"diverged in epoch 1.*than 1e\+06; the flow was restored to its state at the call"
    with pytest.raises(FloatingPointError, match=message):
        fit_density(flow, _data(), epochs=3, **{**FIT, "lr": 1e6})
    assert not flow.training
    assert all(value.isfinite().all() for value in flow.state_dict().values())
    assert _equal(_state(flow), pretrained)


def _poison(optimizer):
    with torch.no_grad():
        optimizer.param_groups[0]["params"][0].fill_(float("nan"))


def test_a_divergence_in_epoch_3_restores_the_best_of_epochs_1_and_2():
    flow = _flow()
    reference, best = _best_of_two_epochs(flow)

    where = f"best state (epoch {best.best_epoch + 1}, validation NLL {best.best_val_nll:.4f})"
    with (
        _at_step(8, _poison, after=True),  # the second step of epoch 3
        pytest.raises(FloatingPointError, match=r"diverged in epoch 3") as caught,
    ):
        fit_density(flow, _data(), epochs=5, **FIT)
    assert f"the flow was restored to its {where}" in str(caught.value)
    assert not flow.training
    assert _equal(_state(flow), _state(reference))


def test_a_fine_tuning_run_worse_than_the_call_falls_back_to_the_call():
    flow = _flow()
    fit_density(flow, _data(), epochs=3, **FIT)
    pretrained = _state(flow)

    def derail(optimizer):
        with torch.no_grad():
            optimizer.param_groups[0]["params"][0].add_(5.0)

    message = r"diverged in epoch 2.*restored to its state at the call \(validation NLL"
    with (
        _at_step(2, derail, after=True),  # epoch 1 ends finite but worse than the call
        _at_step(5, _poison, after=True),  # and epoch 2 diverges
        pytest.raises(FloatingPointError, match=message),
    ):
        fit_density(flow, _data(), epochs=3, **FIT)
    assert not flow.training
    assert _equal(_state(flow), pretrained)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupt_in_epoch_3_restores_the_best_epoch(error, capsys):
    flow = _flow()
    reference, best = _best_of_two_epochs(flow)
    last_step = {}

    def interrupt(optimizer):
        last_step.update(_state(flow))
        raise error("stop")

    with _at_step(8, interrupt), pytest.raises(error) as caught:  # in epoch 3's second batch
        fit_density(flow, _data(), epochs=5, **{**FIT, "progress": True})
    assert not flow.training
    assert _equal(_state(flow), _state(reference))
    assert not _equal(last_step, _state(reference))  # not merely the last step's parameters
    if sys.version_info >= (3, 11):
        assert f"best state (epoch {best.best_epoch + 1}" in _notes(caught.value)
    assert capsys.readouterr().err.endswith("\n")  # the bar ended its line


def test_an_interrupt_before_any_epoch_ends_restores_the_state_at_the_call():
    flow = _flow()
    at_call = _state(flow)

    def interrupt(optimizer):
        raise KeyboardInterrupt

    with _at_step(2, interrupt), pytest.raises(KeyboardInterrupt) as caught:
        fit_density(flow, _data(), epochs=3, **FIT)
    assert not flow.training
    assert _equal(_state(flow), at_call)
    if sys.version_info >= (3, 11):
        assert "restored to its state at the call" in _notes(caught.value)


def _non_finite_rows() -> torch.Tensor:
    data = _data()
    data[4, 0], data[17, 1], data[90, 0] = float("nan"), float("inf"), -float("inf")
    return data


def _constant_columns(*columns: int) -> torch.Tensor:
    data = _data(3)
    for column in columns:
        data[:, column] = 1.5 - column
    return data


def _huge_value() -> torch.Tensor:
    data = _data()
    data[7, 1] = 3e30
    return data


@pytest.mark.parametrize(
    "dim, make, message",
    [
        (3, _data, None),  # a flow for three columns on two: the layer's own error
        (2, _non_finite_rows, r"data has 3 rows with NaN or infinite values \(rows 4, 17, 90\)"),
        (3, lambda: _constant_columns(2), r"column 2 is constant \(every training row is -0\.5\)"),
        (3, lambda: _constant_columns(0, 2), r"columns 0, 2 are constant .* is 1\.5, -0\.5,"),
        (
            2,
            _huge_value,
            r"values up to 3e\+30 overflow float32 .*standardize the data or use float64",
        ),
    ],
    ids=["wrong dim", "non-finite rows", "constant column", "constant columns", "overflow"],
)
def test_bad_arguments_are_refused_before_the_flow_changes(dim, make, message):
    flow = _flow(dim)
    next(iter(flow.children())).eval()  # a mixed mode, which must survive as it is
    modes = [module.training for module in flow.modules()]
    before = _state(flow)
    # Without Pyro's validation, NaN rows used to reach the loss and read as a divergence.
    with pyro.validation_enabled(False), pytest.raises(ValueError, match=message):
        fit_density(flow, make(), epochs=2, **FIT)
    assert [module.training for module in flow.modules()] == modes
    assert _equal(_state(flow), before)
