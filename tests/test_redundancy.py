import math

import pytest
import torch

from nearfar.losses.redundancy import VicregTerms, barlow_twins, vicreg, vicreg_terms


def column_stats(z, unbiased):
    n, d = z.shape
    means, variances = [], []
    for j in range(d):
        m = sum(z[b, j] for b in range(n)) / n
        v = sum((z[b, j] - m) ** 2 for b in range(n)) / (n - 1 if unbiased else n)
        means.append(m)
        variances.append(v)
    return means, variances


def reference_barlow(z1, z2, lam, eps=1e-5):
    # Zbontar et al. 2021: C_ij = sum_b z1n_bi z2n_bj / N on batch-standardised features
    n, d = z1.shape
    m1, v1 = column_stats(z1, unbiased=False)
    m2, v2 = column_stats(z2, unbiased=False)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum((z1[b, i] - m1[i]) / torch.sqrt(v1[i] + eps)
                    * (z2[b, j] - m2[j]) / torch.sqrt(v2[j] + eps) for b in range(n)) / n
            loss = loss + ((1 - c) ** 2 if i == j else lam * c ** 2)
    return loss


def reference_vicreg_terms(z1, z2, eps=1e-4):
    # Bardes et al. 2022: s(Z, Z') mean squared distance; v(Z) hinge on the std at gamma = 1;
    # c(Z) = sum of squared off-diagonal covariances / d
    n, d = z1.shape
    inv = sum((z1[b, j] - z2[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)
    var = 0.0
    cov = 0.0
    for z in (z1, z2):
        m, v = column_stats(z, unbiased=True)
        var = var + sum(torch.relu(1 - torch.sqrt(v[j] + eps)) for j in range(d)) / d / 2
        for i in range(d):
            for j in range(d):
                if i != j:
                    c = sum((z[b, i] - m[i]) * (z[b, j] - m[j]) for b in range(n)) / (n - 1)
                    cov = cov + c ** 2 / d
    return inv, var, cov


def make_pair(n=6, d=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    z1 = (scale * (base + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)))
    z2 = (scale * (base + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)))
    return z1.requires_grad_(), z2.requires_grad_()


def hadamard_columns(n, d):
    # n = 8: centred, mutually orthogonal +-1 columns (Sylvester Hadamard without the ones)
    h = torch.tensor([[1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h[:, 1:d + 1]


def assert_value_and_grads(got, want, inputs, rel=1e-10):
    assert math.isclose(got.item(), want.item(), rel_tol=rel, abs_tol=1e-13)
    grads_got = torch.autograd.grad(got, inputs, retain_graph=True)
    grads_want = torch.autograd.grad(want, inputs, retain_graph=True)
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, rtol=rel, atol=1e-12)


@pytest.mark.parametrize("lam", [5e-3, 0.0, 1.0])
def test_barlow_matches_reference(lam):
    z1, z2 = make_pair()
    assert_value_and_grads(barlow_twins(z1, z2, lambda_offdiag=lam),
                           reference_barlow(z1, z2, lam), (z1, z2))


def test_vicreg_terms_and_loss_match_reference():
    z1, z2 = make_pair(seed=1, scale=0.7)   # some stds below 1: the hinge is active
    terms = vicreg_terms(z1, z2)
    assert isinstance(terms, VicregTerms)
    ref = reference_vicreg_terms(z1, z2)
    assert terms.variance.item() > 0
    for got, want in zip(terms, ref):
        assert_value_and_grads(got, want, (z1, z2))
    loss = vicreg(z1, z2, invariance_weight=2.0, variance_weight=3.0, covariance_weight=0.5)
    want = 2.0 * ref[0] + 3.0 * ref[1] + 0.5 * ref[2]
    assert_value_and_grads(loss, want, (z1, z2))
    default = vicreg(z1, z2)
    assert math.isclose(default.item(), (25 * ref[0] + 25 * ref[1] + ref[2]).item(),
                        rel_tol=1e-12)


@pytest.mark.parametrize("fn", [barlow_twins, vicreg])
def test_view_swap_and_batch_permutation_invariance(fn):
    z1, z2 = make_pair(n=9, d=5, seed=2)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    a = fn(z1, z2)
    assert torch.allclose(a, fn(z2, z1), rtol=1e-12, atol=0)
    assert torch.allclose(a, fn(z1[perm], z2[perm]), rtol=1e-12, atol=0)


def test_barlow_identical_decorrelated_inputs_is_zero():
    z = hadamard_columns(8, 4)
    loss = barlow_twins(z, z)
    # C = I / (1 + eps): loss = D (eps / (1 + eps))^2
    assert loss.item() < 1e-9
    assert math.isclose(loss.item(), 4 * (1e-5 / (1 + 1e-5)) ** 2, rel_tol=1e-6)


def test_barlow_is_invariant_to_per_feature_affine_maps():
    z1, z2 = make_pair(n=10, d=3, seed=3)
    a = barlow_twins(z1, z2, eps=1e-12)
    b = barlow_twins(3 * z1 + 5, 0.5 * z2 - 1, eps=1e-12)
    assert torch.allclose(a, b, rtol=1e-9)


def test_barlow_constant_feature_is_finite():
    z = torch.randn(6, 3, dtype=torch.float64)
    z[:, 1] = 2.0
    z.requires_grad_()
    loss = barlow_twins(z, z, lambda_offdiag=0.0)
    (g,) = torch.autograd.grad(loss, (z,))
    assert math.isfinite(loss.item()) and bool(torch.isfinite(g).all())
    assert math.isclose(loss.item(), 1.0, rel_tol=1e-6)   # the dead dimension costs (1 - 0)^2


def test_vicreg_identical_spread_decorrelated_inputs_is_zero():
    z = hadamard_columns(8, 5)    # unbiased std sqrt(8/7) > 1, covariance 0
    terms = vicreg_terms(z, z)
    assert terms.invariance.item() == 0.0
    assert terms.variance.item() == 0.0
    assert terms.covariance.item() < 1e-28
    assert vicreg(z, z).item() < 1e-27


def test_vicreg_collapse_costs_the_full_variance_term():
    z = torch.ones(6, 4)
    terms = vicreg_terms(z, z)
    assert math.isclose(terms.variance.item(), 1 - math.sqrt(1e-4), rel_tol=1e-6)


@pytest.mark.parametrize("fn,kwargs,name", [
    (barlow_twins, {"z1": torch.randn(1, 3), "z2": torch.randn(1, 3)}, "z1"),
    (barlow_twins, {"z1": torch.randn(4)}, "z1"),
    (barlow_twins, {"z2": torch.randn(4, 2)}, "z2"),
    (barlow_twins, {"z2": torch.randn(4, 3, dtype=torch.float64)}, "z2"),
    (barlow_twins, {"z2": torch.full((4, 3), float("nan"))}, "z2"),
    (barlow_twins, {"lambda_offdiag": -1.0}, "lambda_offdiag"),
    (barlow_twins, {"eps": 0.0}, "eps"),
    (vicreg, {"z1": torch.randn(1, 3), "z2": torch.randn(1, 3)}, "z1"),
    (vicreg, {"z1": torch.ones(4, 3, dtype=torch.int32)}, "z1"),
    (vicreg, {"z2": torch.randn(5, 3)}, "z2"),
    (vicreg, {"invariance_weight": -1.0}, "invariance_weight"),
    (vicreg, {"variance_weight": float("nan")}, "variance_weight"),
    (vicreg, {"covariance_weight": "1"}, "covariance_weight"),
    (vicreg, {"eps": -1e-4}, "eps"),
    (vicreg_terms, {"z2": torch.randn(4, 3, 1)}, "z2"),
    (vicreg_terms, {"eps": 0}, "eps"),
])
def test_bad_inputs_name_the_argument(fn, kwargs, name):
    args = {"z1": torch.randn(4, 3), "z2": torch.randn(4, 3)}
    args.update(kwargs)
    z1, z2 = args.pop("z1"), args.pop("z2")
    with pytest.raises(ValueError, match=name):
        fn(z1, z2, **args)
