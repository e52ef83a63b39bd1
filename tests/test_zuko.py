"""pyro-lunet layers inside zuko flows, and zuko flows back in Pyro (zuko is optional)."""

import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_lunet
from pyro_lunet import conditional_flow, families


def test_core_package_imports_without_zuko():
    code = (
        "import sys; sys.modules['zuko'] = None\n"
        "import pyro_lunet\n"
        "assert 'zuko' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    pyro_lunet.StructuredLinearTransform\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'pyro-lunet[zuko]'\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


zuko = pytest.importorskip("zuko")
from pyro.contrib.zuko import ZukoToPyro  # noqa: E402

from pyro_lunet.zuko import PyroLazyTransform, StructuredLinearTransform, to_zuko  # noqa: E402

D, C = 3, 2


def _base(dtype=torch.float64):
    return zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal,
        torch.zeros(D, dtype=dtype),
        torch.ones(D, dtype=dtype),
        buffer=True,
    )


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("family", families())
@pytest.mark.parametrize("context", [0, C])
def test_zuko_flow_log_prob_matches_the_direct_computation(family, context, one_thread):
    torch.manual_seed(0)
    ours = StructuredLinearTransform(D, context=context, layer=family)
    maf = zuko.flows.MaskedAutoregressiveTransform(D, context)
    flow = zuko.flows.Flow([ours, maf], _base()).double()
    _randomize(ours)
    if family == "self_normalizing":
        flow.eval()  # SNF's exact mode
    c = torch.randn(5, C, dtype=torch.float64) if context else None
    x = torch.randn(5, D, dtype=torch.float64)
    log_p = flow(c).log_prob(x)
    # By hand: Pyro's layer scores x (its inverse), then zuko's MAF.
    module = ours.transform
    pyro_t = module.condition(c) if context else module
    u = pyro_t.with_cache(0).inv(x)
    ladj = -pyro_t.log_abs_det_jacobian(u, x)
    t2 = maf(c)
    z = t2(u)
    expected = (
        torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + ladj
        + t2.log_abs_det_jacobian(u, z)
    )
    torch.testing.assert_close(log_p, expected)
    # zuko's sampling runs the inverse chain; its log_prob is the same.
    sample, log_q = flow(c).rsample_and_log_prob((4,))
    assert sample.shape == ((4, 5, D) if context else (4, D))
    torch.testing.assert_close(log_q, flow(c).log_prob(sample), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("family", families())
def test_zuko_round_trip_and_log_det_against_autograd(family, one_thread):
    torch.manual_seed(1)
    lazy = StructuredLinearTransform(D, context=C, layer=family).double()
    _randomize(lazy)
    if family == "self_normalizing":
        lazy.eval()
    c = torch.randn(C, dtype=torch.float64)
    x = torch.randn(D, dtype=torch.float64)
    t = lazy(c)
    z, ladj = t.call_and_ladj(x)
    torch.testing.assert_close(lazy(c).inv(z), x, rtol=1e-10, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda v: lazy(c)(v), x)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)
    # zuko's inverse wrapper gives the same transform backwards.
    torch.testing.assert_close(lazy.inv(c)(z), x, rtol=1e-10, atol=1e-10)


def test_gradients_flow_through_zuko_sampling_and_scoring(one_thread):
    torch.manual_seed(2)
    ours = StructuredLinearTransform(D, context=C, layer="butterfly")
    flow = zuko.flows.Flow([ours, zuko.flows.MaskedAutoregressiveTransform(D, C)], _base(None))
    flow.float()
    c = torch.randn(8, C)
    loss = -flow(c).log_prob(torch.randn(8, D)).mean() + flow(c).rsample().square().mean()
    loss.backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_a_conditional_flow_as_a_zuko_transform(one_thread):
    torch.manual_seed(3)
    flow = zuko.flows.Flow(to_zuko(conditional_flow(D, C, num_blocks=1, role="density")), _base())
    flow.double()
    c = torch.randn(6, C, dtype=torch.float64)
    x = torch.randn(6, D, dtype=torch.float64)
    pyro_dist = dist.ConditionalTransformedDistribution(
        dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1),
        [flow.transform.transform],
    )
    torch.testing.assert_close(flow(c).log_prob(x), pyro_dist.condition(c).log_prob(x))
    assert flow(c).sample().shape == (6, D)


def test_adapter_errors():
    with pytest.raises(ValueError, match="TransformModule or ConditionalTransformModule"):
        PyroLazyTransform(torch.nn.Linear(2, 2))
    lazy = StructuredLinearTransform(D, context=C)
    with pytest.raises(ValueError, match="expected a context tensor, got None"):
        lazy(None)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\), got \(4, 3\)"):
        lazy(torch.randn(4, 3))
    with pytest.raises(ValueError, match="hidden_features applies to a conditional layer"):
        StructuredLinearTransform(D, hidden_features=[8])
    with pytest.raises(ValueError, match="context must be an int >= 0, got -1"):
        StructuredLinearTransform(D, context=-1)
    assert pyro_lunet.StructuredLinearTransform is StructuredLinearTransform


def test_zuko_flow_back_in_pyro_as_an_amortized_guide(one_thread):
    """ZukoToPyro(flow(x_i)) in a plate: SVI runs and its loss falls."""
    torch.manual_seed(4)
    pyro.clear_param_store()
    n, dz, dx = 256, D, C
    M = torch.randn(dx, dz)
    data = torch.randn(n, dz) @ M.T + 0.5 * torch.randn(n, dx)
    flow = zuko.flows.Flow(
        [
            StructuredLinearTransform(dz, context=dx, layer="lu"),
            zuko.flows.MaskedAutoregressiveTransform(dz, dx),
            StructuredLinearTransform(dz, context=dx, layer="circulant"),
        ],
        _base(None),
    )
    flow.float()

    def model(data):
        with pyro.plate("data", n, subsample_size=32) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(dz), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ M.T, 0.5).to_event(1), obs=data[idx])

    def guide(data):
        pyro.module("flow", flow)
        with pyro.plate("data", n, subsample_size=32) as idx:
            pyro.sample("z", ZukoToPyro(flow(data[idx])))

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    torch.manual_seed(5)
    first = sum(svi.evaluate_loss(data) for _ in range(10)) / 10
    for _ in range(100):
        svi.step(data)
    last = sum(svi.evaluate_loss(data) for _ in range(10)) / 10
    assert last < first - 0.2 * abs(first), (first, last)


def test_zuko_module_doctests():
    import doctest

    import pyro_lunet.zuko as zuko_module

    failures, tried = doctest.testmod(zuko_module, verbose=False)
    assert tried > 0 and failures == 0
