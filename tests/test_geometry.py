import math

import pytest
import torch

from nearfar.losses.geometry import alignment, uniformity


def unit(z):
    return z / z.norm(dim=1, keepdim=True)


def reference_alignment(z1, z2, alpha):
    # Wang & Isola 2020: E ||f(x) - f(y)||^alpha over positive pairs
    x, y = unit(z1), unit(z2)
    return sum(((x[i] - y[i]) ** 2).sum() ** (alpha / 2) for i in range(len(x))) / len(x)


def reference_uniformity(z, t):
    # log E_{i<j} exp(-t ||f(x_i) - f(x_j)||^2)
    x = unit(z)
    terms = [torch.exp(-t * ((x[i] - x[j]) ** 2).sum())
             for i in range(len(x)) for j in range(i + 1, len(x))]
    return torch.log(sum(terms) / len(terms))


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


def assert_value_and_grads(got, want, inputs, rel=1e-10):
    assert math.isclose(got.item(), want.item(), rel_tol=rel)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        assert torch.allclose(a, b, rtol=rel, atol=1e-13)


@pytest.mark.parametrize("alpha", [2, 1, 0.5, 3.0])
def test_alignment_matches_reference(alpha):
    z1, z2 = randn(6, 4), randn(6, 4, seed=1)
    assert_value_and_grads(alignment(z1, z2, alpha=alpha), reference_alignment(z1, z2, alpha),
                           (z1, z2))


@pytest.mark.parametrize("t", [2, 0.5, 10.0])
def test_uniformity_matches_reference(t):
    z = randn(7, 3)
    assert_value_and_grads(uniformity(z, t=t), reference_uniformity(z, t), (z,))


def test_alignment_limits():
    z = randn(5, 3)
    for alpha in (2, 1, 0.5):
        loss = alignment(z, 4 * z, alpha=alpha)
        assert loss.item() < 1e-15
        (g,) = torch.autograd.grad(loss, (z,))
        assert bool(torch.isfinite(g).all())
    opposite = alignment(z, -z, alpha=2)
    assert math.isclose(opposite.item(), 4.0, rel_tol=1e-12)


def test_uniformity_limits():
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert math.isclose(uniformity(antipodal).item(), -8.0, rel_tol=1e-12)
    assert math.isclose(uniformity(antipodal, t=3).item(), -12.0, rel_tol=1e-12)
    collapsed = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
    value = uniformity(collapsed)
    assert abs(value.item()) < 1e-15
    (g,) = torch.autograd.grad(value, (collapsed,))
    assert bool(torch.isfinite(g).all())
    # the vertices of a regular simplex are the most uniform N points: all distances^2
    # are 2N/(N-1)
    simplex = torch.eye(4, dtype=torch.float64) - 0.25
    assert math.isclose(uniformity(simplex).item(), -2 * 2 * 4 / 3, rel_tol=1e-12)


def test_uniformity_large_t_does_not_underflow():
    antipodal = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert math.isclose(uniformity(antipodal, t=100).item(), -400.0, rel_tol=1e-6)


def test_permutation_invariance():
    z1, z2 = randn(8, 3), randn(8, 3, seed=1)
    perm = torch.randperm(8)
    assert torch.allclose(alignment(z1, z2), alignment(z1[perm], z2[perm]), rtol=1e-12)
    assert torch.allclose(alignment(z1, z2), alignment(z2, z1), rtol=1e-12)
    assert torch.allclose(uniformity(z1), uniformity(z1[perm]), rtol=1e-12)


def test_usable_as_metric_without_grad():
    z1, z2 = torch.randn(10, 4), torch.randn(10, 4)
    with torch.no_grad():
        a, u = alignment(z1, z2), uniformity(z1)
    assert not a.requires_grad and not u.requires_grad
    assert 0 <= a.item() <= 4 and -8 <= u.item() <= 0


@pytest.mark.parametrize("kwargs,name", [
    ({"z1": torch.randn(3)}, "z1"),
    ({"z2": torch.randn(4, 2)}, "z2"),
    ({"z2": torch.randn(4, 3, dtype=torch.float64)}, "z2"),
    ({"z2": torch.full((4, 3), float("inf"))}, "z2"),
    ({"alpha": 0}, "alpha"),
    ({"alpha": -1.0}, "alpha"),
])
def test_alignment_bad_inputs(kwargs, name):
    args = {"z1": torch.randn(4, 3), "z2": torch.randn(4, 3)}
    args.update(kwargs)
    z1, z2 = args.pop("z1"), args.pop("z2")
    with pytest.raises(ValueError, match=name):
        alignment(z1, z2, **args)


@pytest.mark.parametrize("z,t,name", [
    (torch.randn(1, 3), 2, "z"),
    (torch.randn(4), 2, "z"),
    (torch.ones(4, 3, dtype=torch.long), 2, "z"),
    (torch.full((4, 3), float("nan")), 2, "z"),
    (torch.randn(4, 3), 0, "t"),
    (torch.randn(4, 3), float("inf"), "t"),
])
def test_uniformity_bad_inputs(z, t, name):
    with pytest.raises(ValueError, match=name):
        uniformity(z, t=t)
