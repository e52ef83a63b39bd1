"""LU-specific behaviour beyond the contract suite."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyro_lunet import LULinear, activation_flow, lu_linear, lu_net
from pyro_lunet.transforms.lu import _block_bounds, _factors, _LUProduct, _LUSolve, _solve_rows


@pytest.mark.parametrize("role", ["guide", "density"])
def test_init_from_matrix_reproduces_it(role):
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64) + 6 * torch.eye(6, dtype=torch.float64)
    layer = lu_linear(6, init=a, role=role).double()
    torch.testing.assert_close(layer.weight(), a)
    torch.testing.assert_close(layer.log_abs_det(), torch.linalg.slogdet(a)[1])


def test_init_from_matrix_needing_pivoting_is_refused():
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="pivot"):
        lu_linear(2, init=swap)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        lu_linear(3, init=torch.eye(2))


def test_orthogonal_init_is_orthogonal_and_identity_init_is_identity():
    w = lu_linear(32, init="orthogonal").double().weight()
    torch.testing.assert_close(w @ w.T, torch.eye(32, dtype=w.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(lu_linear(8).weight(), torch.eye(8))


def test_negative_diagonal_signs_are_kept():
    a = torch.diag(torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64))
    layer = lu_linear(3, init=a).double()
    torch.testing.assert_close(layer.weight(), a)
    assert layer.diag_sign.tolist() == [1.0, -1.0, 1.0]


@pytest.mark.parametrize(
    "bad", [dict(role="sideways"), dict(product="sideways"), dict(init="random")]
)
def test_bad_keywords_are_value_errors(bad):
    with pytest.raises(ValueError):
        LULinear(4, **bad)


@pytest.mark.parametrize("dim", [1, 127, 300, 1030])
def test_blocked_product_and_its_gradients_match_dense_autograd(dim):
    """The structure-skipping kernel against plain autograd through L @ U."""
    torch.manual_seed(dim)
    layer = lu_linear(dim, init="orthogonal").double()
    with torch.no_grad():
        layer.packed.add_(0.05 * torch.randn_like(layer.packed))
    x = torch.randn(7, dim, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, dim, dtype=torch.float64)
    y = _LUProduct.apply(x, layer.packed, layer.diag_sign, None)
    gx, gp = torch.autograd.grad(y, (x, layer.packed), g)
    lower, upper = layer.lower_upper()
    y_ref = x @ (lower @ upper).T
    gx_ref, gp_ref = torch.autograd.grad(y_ref, (x, layer.packed), g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gp, gp_ref)


@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("dim", [6, 300, 1030])
def test_blocked_product_with_a_shift_matches_dense_autograd(dim, x_grad):
    """``L U (x - s)`` with the shift inside the kernel: values and the gradients of x,
    the packed factors and the shift, with and without a batch gradient; at a small D
    gradcheck and gradgradcheck (create_graph)."""
    torch.manual_seed(dim)
    layer = lu_linear(dim, init="identity").double()
    with torch.no_grad():
        layer.packed.add_(0.01 * torch.randn_like(layer.packed))
        layer.diag_sign[::2] = -1.0
    x = torch.randn(7, dim, dtype=torch.float64, requires_grad=x_grad)
    shift = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, dim, dtype=torch.float64)
    wrt = (x, layer.packed, shift) if x_grad else (layer.packed, shift)
    y = _LUProduct.apply(x, layer.packed, layer.diag_sign, shift)
    grads = torch.autograd.grad(y, wrt, g)
    y_ref = (x - shift) @ torch.mm(*layer.lower_upper()).T
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, torch.autograd.grad(y_ref, wrt, g)):
        torch.testing.assert_close(got, want)
    if dim <= 6:
        fn = lambda x, p, s: _LUProduct.apply(x, p, layer.diag_sign, s)  # noqa: E731
        args = (x.detach().requires_grad_(), layer.packed, shift)
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("role", ["guide", "density"])
def test_large_layer_inverse_with_bias_matches_the_dense_weight(role):
    """At D >= 256 the inverse takes the bias inside its kernel (no second call for it):
    log-density and every parameter's gradient against the dense weight, float64."""
    torch.manual_seed(0)
    layer = lu_linear(300, init="identity", role=role, cache_size=0).double()
    with torch.no_grad():
        layer.packed.add_(0.01 * torch.randn_like(layer.packed))
        layer.bias.normal_()
    y = torch.randn(9, 300, dtype=torch.float64)
    x = layer.inv(y)
    loss = (x.square().sum() - layer.log_abs_det_jacobian(x, y).sum()) / 2
    grads = torch.autograd.grad(loss, (layer.packed, layer.bias))
    weight = layer.weight()  # y = W x + b, differentiable
    x_ref = torch.linalg.solve(weight, (y - layer.bias).T).T
    loss_ref = (x_ref.square().sum() - 9 * torch.linalg.slogdet(weight)[1]) / 2
    torch.testing.assert_close(x, x_ref)
    for got, want in zip(grads, torch.autograd.grad(loss_ref, (layer.packed, layer.bias))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dim", [1, 6, 300, 1030])
def test_structured_solve_and_its_gradients_match_dense_autograd(dim):
    """The solve side's hand-written backward against autograd through two triangular solves,
    and, at a small D, gradcheck and gradgradcheck (create_graph)."""
    torch.manual_seed(dim)
    # Near the identity above a few hundred dims: the LU factors of a random
    # orthogonal matrix, with flipped diagonal signs, grow ill-conditioned with D.
    init, noise = ("orthogonal", 0.05) if dim <= 300 else ("identity", 0.01)
    layer = lu_linear(dim, init=init).double()
    with torch.no_grad():
        layer.packed.add_(noise * torch.randn_like(layer.packed))
        layer.diag_sign[::2] = -1.0
    y = torch.randn(7, dim, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, dim, dtype=torch.float64)
    x = _LUSolve.apply(y, layer.packed, layer.diag_sign)
    gy, gp = torch.autograd.grad(x, (y, layer.packed), g)
    x_ref = _solve_rows(y, *_factors(layer.packed, layer.diag_sign))[1].T
    gy_ref, gp_ref = torch.autograd.grad(x_ref, (y, layer.packed), g)
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(x @ (torch.mm(*layer.lower_upper())).T, y)
    torch.testing.assert_close(gy, gy_ref)
    torch.testing.assert_close(gp, gp_ref)
    if dim <= 6:
        args = (y, layer.packed)
        fn = lambda y, p: _LUSolve.apply(y, p, layer.diag_sign)  # noqa: E731
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_density_step_of_a_large_guide_layer_uses_the_structured_solve(monkeypatch):
    calls = []
    original = _LUSolve.apply
    monkeypatch.setattr(_LUSolve, "apply", lambda *a: calls.append(1) or original(*a))
    layer = lu_linear(256)  # the default (guide) role: its inverse is the solve side
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(256), 1.0).to_event(1), layer)
    d.log_prob(torch.randn(4, 256)).sum().backward()
    assert calls and layer.packed.grad is not None and torch.isfinite(layer.packed.grad).all()


def test_block_bounds_cover_the_dimension():
    for dim in (1, 5, 128, 129, 1000, 4096):
        b = _block_bounds(dim)
        assert b[0] == 0 and b[-1] == dim and all(s < e for s, e in zip(b, b[1:]))


def test_no_grad_product_is_memoized_until_parameters_change():
    layer = lu_linear(5, init="orthogonal")
    x = torch.randn(3, 5)
    with torch.no_grad():
        y1 = layer(x)
        first = layer._derived["lu_t"][1]
        layer(x.clone())
        assert layer._derived["lu_t"][1] is first
        layer.packed.add_(0.1)
        y2 = layer(x.clone())
        assert layer._derived["lu_t"][1] is not first
    assert not torch.allclose(y1, y2)


@pytest.mark.parametrize("dim", [5, 256])
@pytest.mark.parametrize("role", ["guide", "density"])
def test_second_derivatives_match_the_dense_weight(role, dim):
    """Gradient penalty and Hessian-vector product through both directions
    (at D=256 the product direction runs the blocked kernel) against the same
    computation through ``weight()``."""
    torch.manual_seed(dim)
    layer = lu_linear(dim, init="orthogonal", role=role, cache_size=0).double()
    with torch.no_grad():
        layer.packed.add_(0.05 * torch.randn_like(layer.packed))
        layer.bias.normal_()
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)

    def through_layer(x):  # scoring (_inverse) plus sampling (_call)
        return dist.TransformedDistribution(base, [layer]).log_prob(x) + base.log_prob(layer(x))

    def through_weight(x):
        w, b = layer.weight(), layer.bias
        z = torch.linalg.solve(w, (x - b).T).T
        return base.log_prob(z) - torch.linalg.slogdet(w)[1] + base.log_prob(x @ w.T + b)

    x = torch.randn(3, dim, dtype=torch.float64)
    params = (layer.packed, layer.bias)
    v = [torch.randn_like(p) for p in params]
    results = []
    for f in (through_layer, through_weight):
        x_grad = x.clone().requires_grad_()
        (score,) = torch.autograd.grad(f(x_grad).sum(), x_grad, create_graph=True)
        penalty = torch.autograd.grad(score.square().sum(), (x_grad, *params))
        grads = torch.autograd.grad(f(x).mean(), params, create_graph=True)
        hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)
        results.append((*penalty, *hvp))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_deprecated_product_keyword_warns_and_maps_to_role():
    for product, role in (("forward", "guide"), ("inverse", "density")):
        with pytest.warns(DeprecationWarning, match=f"use role='{role}'"):
            layer = lu_linear(3, product=product)
        assert layer.role == role
        with pytest.warns(DeprecationWarning, match="role"):
            assert layer.product == product
        with pytest.warns(DeprecationWarning, match=f"use role='{role}'"):
            flow = lu_net(3, 1, product=product)
        assert {p.role for p in flow.parts if isinstance(p, LULinear)} == {role}
    with pytest.raises(ValueError, match="role= only"):
        lu_linear(3, role="guide", product="forward")
    with pytest.raises(ValueError, match="role= only"):
        lu_net(3, 1, role="density", product="inverse")
    assert lu_linear(3).role == "guide" and lu_net(3, 1).parts[0].role == "guide"  # defaults


def test_lu_net_is_the_activation_flow_of_lu_layers():
    torch.manual_seed(0)
    net = lu_net(3, 2, alpha=0.2, bias=False, role="density", init="orthogonal")
    torch.manual_seed(0)
    flow = activation_flow(3, 2, layer="lu", role="density", alpha=0.2,
                           layer_kwargs={"bias": False, "init": "orthogonal"})  # fmt: skip
    assert [type(p) for p in net.parts] == [type(p) for p in flow.parts]
    assert list(net.state_dict()) == list(flow.state_dict())
    for a, b in zip(net.state_dict().values(), flow.state_dict().values()):
        assert torch.equal(a, b)
    assert all(p.alpha == 0.2 and p.inverse for p in net.parts[1::2])
