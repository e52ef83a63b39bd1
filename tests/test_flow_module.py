"""The fused Flow: the same map and log-dets as a chain of its parts, one cache, small-D kernels."""

from __future__ import annotations

import copy
import importlib
import pickle

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import AffineTransform, affine_coupling, spline_coupling

import pyro_lunet
from pyro_lunet import Flow, activation_flow, coupling_flow, leaky_softplus, lu_linear, lu_net
from pyro_lunet.transforms._fused import LeakySoftplusKernel, LUKernel, RankOneKernel, run_kernels

FAMILIES = pyro_lunet.families()


def _compose_log_det(parts, x):
    """log|det J| and output of the parts run one at a time, as Pyro's ComposeTransform does."""
    chain = ComposeTransformModule(parts)
    y = chain(x)
    return y, chain.log_abs_det_jacobian(x, y)


@pytest.mark.parametrize("role", ["guide", "density"])
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("builder", [activation_flow, coupling_flow], ids=lambda b: b.__name__)
def test_flow_matches_its_parts_run_one_by_one(builder, name, role):
    torch.manual_seed(0)
    flow = builder(6, 2, layer=name, role=role).double().eval()
    for p in flow.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        y_parts, ld_parts = _compose_log_det(flow.parts, x)
    y, ld = flow._run(x, inverse=False)
    torch.testing.assert_close(y, y_parts)
    torch.testing.assert_close(ld, ld_parts)
    x_back, ld_back = flow._run(y_parts, inverse=True)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(ld_back, ld_parts, atol=1e-8, rtol=1e-8)


def test_flow_log_det_matches_autograd_jacobian_in_training_mode():
    torch.manual_seed(1)
    flow = lu_net(4, 3).double()
    for p in flow.parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    x = torch.randn(4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow._run(v, False)[0], x)
    torch.testing.assert_close(flow._run(x, False)[1], torch.linalg.slogdet(jac)[1])


@pytest.mark.parametrize("subtract", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_kernels_gradcheck_and_gradgradcheck(subtract, bias):
    torch.manual_seed(2)
    dim = 4
    packed = (0.3 * torch.randn(dim, dim, dtype=torch.float64)).requires_grad_()
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    b = torch.randn(dim, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)

    def run(x, packed, *rest):
        bias_ = rest[0] if rest else None
        steps = [
            (LUKernel(subtract, -1.0 if subtract else 1.0), (packed, sign, bias_)),
            (LeakySoftplusKernel(0.2, 1.0), ()),
            (LUKernel(False, 1.0), (packed * 0.5, sign, None)),
            (LeakySoftplusKernel(0.3, -1.0), ()),
        ]
        out, log_det = run_kernels(steps, x)
        return out, log_det

    inputs = (x, packed) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(run, inputs)
    assert torch.autograd.gradgradcheck(run, inputs)


def test_kernel_run_matches_reference_ops():
    torch.manual_seed(3)
    dim = 5
    packed = 0.3 * torch.randn(dim, dim, dtype=torch.float64)
    sign = torch.ones(dim, dtype=torch.float64)
    bias = torch.randn(dim, dtype=torch.float64)
    h = torch.randn(7, dim, dtype=torch.float64)
    for kernel, params in [
        (LUKernel(False, 1.0), (packed, sign, bias)),
        (LUKernel(True, -1.0), (packed, sign, bias)),
        (LeakySoftplusKernel(0.1, 1.0), ()),
        (LeakySoftplusKernel(0.1, -1.0), ()),
    ]:
        out, log_det, _ = kernel.forward(h, params)
        ref_out, ref_log_det = kernel.reference(h, params)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(log_det, ref_log_det)


def test_rsample_then_log_prob_runs_the_flow_once():
    flow = lu_net(3, 2)
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), flow)
    calls = []
    original = flow._run
    flow._run = lambda h, inverse: calls.append(inverse) or original(h, inverse)
    z = model.rsample((4,))
    model.log_prob(z).sum().backward()
    assert calls == [False]


def test_flow_cache_is_not_served_after_an_optimizer_step():
    torch.manual_seed(4)
    flow = coupling_flow(4, 2, layer="lu", role="density")
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(4), 1.0).to_event(1), flow)
    data = torch.randn(16, 4)  # the same tensor every step, as full-batch training does
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        loss = -model.log_prob(data).mean()
        loss.backward()
        opt.step()
    fresh = copy.deepcopy(flow)  # no cache at all, not even in Pyro's couplings
    model_fresh = dist.TransformedDistribution(dist.Normal(torch.zeros(4), 1.0).to_event(1), fresh)
    torch.testing.assert_close(model.log_prob(data), model_fresh.log_prob(data.clone()))


def test_foreign_parts_and_nested_flows():
    torch.manual_seed(5)
    inner = Flow([lu_linear(4), leaky_softplus()])
    parts = [
        AffineTransform(torch.zeros(4), 2.0 * torch.ones(4), event_dim=1),
        inner,
        affine_coupling(4),
        spline_coupling(4),
        lu_linear(4, init="orthogonal"),
    ]
    flow = Flow(parts).double()
    parts[0] = AffineTransform(torch.zeros(4).double(), 2.0 * torch.ones(4).double(), event_dim=1)
    flow = Flow(parts).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y, ld = flow._run(x, False)
    jac = torch.stack(
        [torch.autograd.functional.jacobian(lambda v: flow._run(v, False)[0], row) for row in x]
    )
    torch.testing.assert_close(ld, torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(flow._run(y, True)[0], x, atol=1e-6, rtol=1e-6)


def test_state_dicts_are_interchangeable_with_compose_transform_module():
    torch.manual_seed(6)
    flow = lu_net(3, 2)
    chain = ComposeTransformModule(
        [lu_linear(3), leaky_softplus(), lu_linear(3), leaky_softplus(), lu_linear(3)]
    )
    chain.load_state_dict(flow.state_dict())
    flow2 = lu_net(3, 2)
    flow2.load_state_dict(chain.state_dict())
    x = torch.randn(5, 3)
    with torch.no_grad():
        torch.testing.assert_close(flow2(x), chain(x))
        torch.testing.assert_close(flow(x), chain(x))


def test_used_flow_pickles_and_deep_copies():
    flow = activation_flow(3, 2, layer="butterfly")
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), flow)
    z = model.rsample((2,))
    model.log_prob(z).sum().backward()
    for clone in (copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        assert [type(p) for p in clone.parts] == [type(p) for p in flow.parts]
        assert all(a is b for a, b in zip(clone.parts, clone.children()))
        x = torch.randn(4, 3)
        with torch.no_grad():
            torch.testing.assert_close(clone(x), flow(x))


def test_inspection_and_empty_batches():
    flow = lu_net(3, 1)
    assert len(flow) == 3 and flow[1] is flow.parts[1] and list(flow) == flow.parts
    y = flow(torch.zeros(0, 3))
    assert y.shape == (0, 3)
    assert flow.log_abs_det_jacobian(torch.zeros(0, 3), y).shape == (0,)


def test_bad_inputs_and_parts_raise_clear_errors():
    flow = lu_net(3, 1)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\), got \(2, 4\)"):
        flow(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="float64"):
        flow(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be Transforms"):
        Flow([lu_linear(3), torch.nn.Linear(3, 3)])
    with pytest.raises(ValueError, match="at most that many event dims"):
        Flow([torch.distributions.transforms.ReshapeTransform((4,), (2, 2))])


@pytest.mark.parametrize("inverse", [False, True])
def test_affine_coupling_kernel_matches_pyros_own_gradients(inverse):
    """Pyro's AffineCoupling run as a kernel: same values and gradients, clamping included."""
    torch.manual_seed(7)
    part = affine_coupling(5, hidden_dims=[7, 6]).double()
    with torch.no_grad():
        part.nn.layers[-1].bias[3:] = torch.tensor([6.0, -9.0, 0.5], dtype=torch.float64)
    params = list(part.parameters())
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)

    def loss_of(out, log_det):
        return (out * weights[0]).sum() + (log_det * weights[1]).sum()

    flow = Flow([part])
    out, log_det = flow._run(x, inverse)
    got = torch.autograd.grad(loss_of(out, log_det), [x, *params])
    fresh = part
    ref_out = fresh._inverse(x) if inverse else fresh._call(x)
    ref_log_det = fresh.log_abs_det_jacobian(*((ref_out, x) if inverse else (x, ref_out)))
    want = torch.autograd.grad(loss_of(ref_out, ref_log_det), [x, *params], retain_graph=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(log_det, ref_log_det)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # and gradients of gradients, through the reference ops
    (gx,) = torch.autograd.grad(loss_of(*flow._run(x, inverse)), x, create_graph=True)
    (gx_ref,) = torch.autograd.grad(loss_of(ref_out, ref_log_det), x, create_graph=True)
    second = torch.autograd.grad(gx.square().sum(), params[0])
    second_ref = torch.autograd.grad(gx_ref.square().sum(), params[0])
    torch.testing.assert_close(second, second_ref)


@pytest.mark.parametrize("bias", [True, False])
def test_rank_one_kernel_gradcheck_and_gradgradcheck(bias):
    torch.manual_seed(8)
    dim = 4
    a = torch.randn(dim, dim, dtype=torch.float64) + 3 * torch.eye(dim, dtype=torch.float64)
    a_inv = torch.linalg.inv(a)
    log_abs_det_a = torch.linalg.slogdet(a)[1]
    u = (0.3 * torch.randn(dim, dtype=torch.float64)).requires_grad_()
    v = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    b = torch.randn(dim, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)

    def run(x, u, v, *rest):
        params = (a, a_inv, log_abs_det_a, u, v, rest[0] if rest else None)
        steps = [(RankOneKernel(), params), (LeakySoftplusKernel(0.2, 1.0), ())]
        return run_kernels(steps, x)

    inputs = (x, u, v) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(run, inputs)
    assert torch.autograd.gradgradcheck(run, inputs)
    out, log_det = run(*inputs)
    dense = a + torch.outer(u, v)
    torch.testing.assert_close(
        log_det,
        torch.linalg.slogdet(dense)[1]
        + LeakySoftplusKernel(0.2, 1.0).reference(x @ dense.T + (b if bias else 0), ())[1],
    )


# ------------------------------------------------------------ dense sides
DENSE_FAMILIES = ["butterfly", "circulant"]


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dim", [5, 16])
@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_dense_sides_give_the_parts_values_and_gradients(name, dim, inverse, monkeypatch):
    """A flow's small-D layers run as dense kernels, their matrices assembled together:
    the same outputs, log-dets and parameter gradients as the layers' own paths."""
    torch.manual_seed(9)
    flow = activation_flow(dim, 3, layer=name).double()
    for p in flow.parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    x = torch.randn(6, dim, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, dim, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    params = list(flow.parameters())

    def loss_of(out, log_det):
        return (out * weights[0]).sum() + (log_det * weights[1]).sum()

    calls = []
    family = type(flow[0])
    original = family._dense_sides.__func__
    family._dense_sides = classmethod(lambda cls, layers, inv: calls.append(len(layers)) or
                                      original(cls, layers, inv))  # fmt: skip
    try:
        out, log_det = flow._run(x, inverse)
    finally:
        family._dense_sides = classmethod(original)
    assert calls == [4]  # the 4 layers' matrices in one assembly
    got = torch.autograd.grad(loss_of(out, log_det), [x, *params])

    # The layers' structured step (the FFT chain, the grouped level products),
    # one at a time with their own log-dets.
    module = importlib.import_module(type(flow[0]).__module__)
    monkeypatch.setattr(module, "_DENSE_MAX", 0)
    h, total = x, 0.0
    for part in flow.parts[::-1] if inverse else flow.parts:
        prev = h
        h = part._inverse(h) if inverse else part._call(h)
        pair = (h, prev) if inverse else (prev, h)
        log_det_part = part.log_abs_det_jacobian(*pair)
        total = total + (log_det_part.sum(-1) if log_det_part.dim() == 2 else log_det_part)
    want = torch.autograd.grad(loss_of(h, total), [x, *params])
    torch.testing.assert_close(out, h)
    torch.testing.assert_close(log_det, total)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_dense_sides_gradcheck_and_gradgradcheck(name):
    torch.manual_seed(10)
    flow = activation_flow(4, 2, layer=name).double()
    for p in flow.parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    params = [p for p in flow.parameters()]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def run(x, *values):
        with torch.nn.utils.stateless._reparametrize_module(
            flow, dict(zip([n for n, _ in flow.named_parameters()], values))
        ):
            return flow._run(x, inverse=False)

    inputs = (x, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(run, inputs)
    assert torch.autograd.gradgradcheck(run, inputs)


def test_dense_side_layers_standalone_and_without_grad_match_the_flow():
    """The same matrices serve a lone layer (memoized without grad) and a flow's kernel."""
    torch.manual_seed(11)
    for name in DENSE_FAMILIES:
        layer = pyro_lunet.FAMILIES[name].factory(7, init="orthogonal").double()
        flow = Flow([layer])
        x = torch.randn(5, 7, dtype=torch.float64)
        with torch.no_grad():
            y_plain = layer._call(x)
            x_plain = layer._inverse(y_plain)
        y, _ = flow._run(x, inverse=False)
        torch.testing.assert_close(y, y_plain)
        torch.testing.assert_close(x_plain, x)
        torch.testing.assert_close(layer.weight() @ x.T, (y_plain - layer.bias).T)


# ------------------------------------------------------------ packed networks
def _packed_copy(net):
    """A PackedDenseNN holding ``net``'s (a Pyro DenseNN's) weights."""
    from pyro_lunet.transforms.packed_nn import PackedDenseNN

    packed = PackedDenseNN(net.input_dim, net.hidden_dims, net.param_dims).to(
        next(net.parameters()).dtype
    )
    with torch.no_grad():
        packed.flat.copy_(
            torch.cat([t.reshape(-1) for l in net.layers for t in (l.weight, l.bias)])
        )
    return packed


@pytest.mark.parametrize("inverse", [False, True])
def test_packed_dense_nn_is_pyros_dense_nn_in_one_tensor(inverse):
    """Same outputs as DenseNN; as a coupling's network inside a flow (the kernel path) the
    same values and gradients as the coupling run by Pyro's own code."""
    torch.manual_seed(12)
    part = affine_coupling(5, hidden_dims=[7, 6]).double()
    packed = _packed_copy(part.nn)
    assert [p.shape for p in packed.parameters()] == [torch.Size([sum(
        o * i + o for o, i in packed.shapes)])]  # fmt: skip
    x = torch.randn(4, 2, dtype=torch.float64)
    for a, b in zip(part.nn(x), packed(x)):
        torch.testing.assert_close(a, b)

    reference = copy.deepcopy(part)
    part.nn = packed
    h = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    out, log_det = Flow([part])._run(h, inverse)
    loss = (out * weights[0]).sum() + (log_det * weights[1]).sum()
    got = torch.autograd.grad(loss, [h, packed.flat])
    ref_out = reference._inverse(h) if inverse else reference._call(h)
    pair = (ref_out, h) if inverse else (h, ref_out)
    ref_log_det = reference.log_abs_det_jacobian(*pair)
    ref_loss = (ref_out * weights[0]).sum() + (ref_log_det * weights[1]).sum()
    ref_params = [t for l in reference.nn.layers for t in (l.weight, l.bias)]
    want = torch.autograd.grad(ref_loss, [h, *ref_params])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(log_det, ref_log_det)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], torch.cat([g.reshape(-1) for g in want[1:]]))


@pytest.mark.parametrize("inverse", [False, True])
def test_packed_coupling_with_soft_bounds_kernel_matches_its_plain_ops(inverse):
    """A coupling whose log-scale is softly bounded: kernel values and gradients, and
    gradients of gradients, against Pyro's coupling running the network's own forward."""
    from pyro.distributions.transforms import AffineCoupling

    from pyro_lunet.transforms.flow import _forget_intermediates
    from pyro_lunet.transforms.packed_nn import PackedDenseNN

    torch.manual_seed(13)
    net = PackedDenseNN(2, [6], [3, 3], log_scale_bounds=(-1.5, 0.7)).double()
    with torch.no_grad():
        net.flat.mul_(4.0)  # log-scales well into the bounds' saturation
    part = AffineCoupling(2, net, log_scale_min_clip=-2.5, log_scale_max_clip=1.7)
    h = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)

    def loss_of(out, log_det):
        return (out * weights[0]).sum() + (log_det * weights[1]).sum()

    out, log_det = Flow([part])._run(h, inverse)
    ref_out = part._inverse(h) if inverse else part._call(h)
    pair = (ref_out, h) if inverse else (h, ref_out)
    ref_log_det = part.log_abs_det_jacobian(*pair)
    _forget_intermediates(part)  # Pyro's coupling keeps the pair: the flow must not see it
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(log_det, ref_log_det)
    assert ref_log_det.abs().max() > 0.5  # the bound is exercised, not the identity
    got = torch.autograd.grad(loss_of(out, log_det), [h, net.flat], create_graph=True)
    want = torch.autograd.grad(loss_of(ref_out, ref_log_det), [h, net.flat], create_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    second = torch.autograd.grad(got[0].square().sum(), net.flat)
    second_ref = torch.autograd.grad(want[0].square().sum(), net.flat)
    torch.testing.assert_close(second, second_ref)


def test_soft_bound_symmetric_and_general_paths_agree():
    from pyro_lunet.transforms._fused import _soft_bound_and_slope

    raw = torch.linspace(-30, 30, 101, dtype=torch.float64)
    value, slope = _soft_bound_and_slope(raw, (-2.0, 2.0))
    # the general path, as for unequal bounds, with equal ones
    width = torch.where(raw > 0, 2.0, -2.0).to(raw)
    t = torch.tanh(raw / width)
    torch.testing.assert_close(value, width * t, rtol=0, atol=0)
    torch.testing.assert_close(slope, 1 - t * t, rtol=0, atol=0)
    assert value.abs().max() <= 2.0  # saturated ends round to the bound itself
    zero, unit_slope = _soft_bound_and_slope(raw.new_zeros(1), (-2.0, 2.0))
    assert float(zero) == 0.0 and float(unit_slope) == 1.0  # the identity near 0


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("kind", ["elementwise", "lower_cholesky"])
def test_pyros_affine_maps_as_kernels_match_pyro(kind, inverse):
    """Pyro's AffineTransform (vectors) and LowerCholeskyAffine inside a flow run as one
    kernel node: Pyro's own values, log-dets and gradients, in both directions."""
    from pyro.distributions.transforms import LowerCholeskyAffine

    from pyro_lunet.transforms._fused import ElementwiseAffineKernel, TriangularAffineKernel

    torch.manual_seed(11)
    dim = 4
    loc = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    if kind == "elementwise":
        raw = torch.tensor([0.5, -1.3, 2.0, 0.7], dtype=torch.float64, requires_grad=True)

        def make(raw, loc):
            return AffineTransform(loc, raw, event_dim=1)
    else:
        raw = torch.randn(dim, dim, dtype=torch.float64).tril_()
        raw.diagonal().abs_().add_(0.5)
        raw.requires_grad_()

        def make(raw, loc):
            return LowerCholeskyAffine(loc, raw)

    x = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, dim, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def loss_of(out, log_det):
        return (out * weights[0]).sum() + (log_det * weights[1]).sum()

    flow = Flow([make(raw, loc), leaky_softplus()], input_dim=dim)
    out, log_det = flow._run(x, inverse)
    chain = [make(raw, loc), leaky_softplus()]
    ref, ref_log_det = x, torch.zeros(3, dtype=torch.float64)
    for part in reversed(chain) if inverse else chain:
        nxt = part.inv(ref) if inverse else part(ref)
        pair = (nxt, ref) if inverse else (ref, nxt)
        step = part.log_abs_det_jacobian(*pair)
        step = step.sum(-1) if step.dim() == 2 else step
        ref_log_det = ref_log_det + step  # the forward map's, in both directions
        ref = nxt
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(log_det, ref_log_det)
    got = torch.autograd.grad(loss_of(out, log_det), [x, raw, loc])
    want = torch.autograd.grad(loss_of(ref, ref_log_det), [x, raw, loc])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    kernel = (ElementwiseAffineKernel if kind == "elementwise" else TriangularAffineKernel)(inverse)
    params = (loc, raw) if kind == "elementwise" else (raw, loc)
    assert torch.autograd.gradcheck(lambda *a: run_kernels([(kernel, a[1:])], a[0]), (x, *params))
    assert torch.autograd.gradgradcheck(
        lambda *a: run_kernels([(kernel, a[1:])], a[0]), (x, *params)
    )


def test_pyros_affine_transform_with_scalars_runs_its_own_path():
    """Scalar loc and scale are not a vector kernel's: the transform's own path, giving what
    the same parts give chained by Pyro (torch counts a scalar scale's log once per event)."""
    loc, scale = torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    parts = [AffineTransform(loc, scale, event_dim=1), leaky_softplus()]
    flow = Flow(parts, input_dim=3)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y, log_det = flow._run(x, False)
    y_ref, log_det_ref = _compose_log_det(parts, x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(log_det, log_det_ref)
    gx = torch.autograd.grad((y.sum() + log_det.sum()), x)[0]
    gx_ref = torch.autograd.grad((y_ref.sum() + log_det_ref.sum()), x)[0]
    torch.testing.assert_close(gx, gx_ref)


def test_then_is_the_flow_with_one_more_part_without_a_new_module():
    """``Flow._then`` (a guide's per-call location-scale map): the values, log-dets and
    gradients of ``Flow([*parts, last])``, its own cache, no module registered."""
    from pyro_lunet.transforms import base

    torch.manual_seed(3)
    flow = coupling_flow(4, 2, layer="lu").double()
    loc = torch.randn(4, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(4, dtype=torch.float64) + 0.5
    last = AffineTransform(loc, scale, event_dim=1)
    flow(torch.randn(2, 4, dtype=torch.float64))  # the flow's own cache holds a pair
    epoch = base._structure_epoch[0]
    fast = flow._then(last)
    assert base._structure_epoch[0] == epoch  # no module registered: layouts stay cached
    assert fast._cached_x_y == (None, None) and fast._cache_key is None  # nothing inherited
    slow = Flow([*flow.parts, last])
    assert fast.parts == slow.parts and len(flow) == len(fast) - 1
    x = torch.randn(5, 4, dtype=torch.float64)
    for inverse in (False, True):
        got, want = fast._run(x, inverse), slow._run(x, inverse)
        torch.testing.assert_close(got, want)
        grads = [torch.autograd.grad(r[0].sum() + r[1].sum(), [loc, flow[0].packed]) for r in
                 (fast._run(x, inverse), slow._run(x, inverse))]  # fmt: skip
        torch.testing.assert_close(grads[0], grads[1])
    y = fast(x)
    assert fast._cached_x_y[0] is x and flow._cached_x_y[0] is not x  # a cache of its own
    torch.testing.assert_close(fast.log_abs_det_jacobian(x, y), slow._run(x, False)[1])
    with pytest.raises(ValueError, match="plain transform of at most 1 event dims, got LULinear"):
        flow._then(lu_linear(4))
