import math

import pytest
import torch

from nearfar.losses.debiased import debiased_info_nce, hard_negative_info_nce
from nearfar.losses.masks import same_value_mask


def reference_hard_negative(z1, z2, t, tau_plus, beta, exclude=None):
    # Chuang et al. 2020 / Robinson et al. 2021, one anchor at a time:
    # Ng = max((sum_k imp_k neg_k / mean(imp) - tau+ M pos) / (1 - tau+), M e^{-1/t}),
    # imp_k = neg_k^beta, loss = -log(pos / (pos + Ng))
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n2 = len(z)
    n = n2 // 2
    loss = 0.0
    for i in range(n2):
        p = (i + n) % n2
        pos = torch.exp(torch.dot(z[i], z[p]) / t)
        negs = [torch.exp(torch.dot(z[i], z[k]) / t) for k in range(n2)
                if k not in (i, p) and not (exclude is not None and bool(exclude[i, k]))]
        m = len(negs)
        if m:
            negs = torch.stack(negs)
            imp = negs ** beta
            reweighted = (imp * negs).sum() / imp.mean()
        else:
            reweighted = torch.zeros((), dtype=z.dtype)
        ng = (-tau_plus * m * pos + reweighted) / (1 - tau_plus)
        ng = torch.maximum(ng, m * torch.exp(torch.as_tensor(-1 / t, dtype=z.dtype)))
        loss = loss - torch.log(pos / (pos + ng))
    return loss / n2


def reference_nt_xent(z1, z2, t):
    # SimCLR: for each view, -log softmax over the 2N - 1 others
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    sim = z @ z.T / t
    n = len(z1)
    loss = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = torch.cat([sim[i, :i], sim[i, i + 1:]])
        loss = loss - (sim[i, j] - torch.logsumexp(others, 0))
    return loss / (2 * n)


def make_pair(n=6, d=5, seed=0, dtype=torch.float64, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=dtype)
    z1 = (base + noise * torch.randn(n, d, generator=g, dtype=dtype)).requires_grad_()
    z2 = (base + noise * torch.randn(n, d, generator=g, dtype=dtype)).requires_grad_()
    return z1, z2


def check_against(fn, ref, z1, z2, rel=1e-10):
    got = fn(z1, z2)
    want = ref(z1, z2)
    g_got = torch.autograd.grad(got, (z1, z2))
    g_want = torch.autograd.grad(want, (z1, z2))
    assert math.isclose(got.item(), want.item(), rel_tol=rel)
    for a, b in zip(g_got, g_want):
        assert float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.mark.parametrize("t,tau_plus", [(0.5, 0.1), (0.2, 0.0), (1.0, 0.3), (0.1, 0.05)])
def test_debiased_matches_reference(t, tau_plus):
    z1, z2 = make_pair()
    check_against(lambda a, b: debiased_info_nce(a, b, temperature=t, tau_plus=tau_plus),
                  lambda a, b: reference_hard_negative(a, b, t, tau_plus, 0.0), z1, z2)


@pytest.mark.parametrize("t,tau_plus,beta", [(0.5, 0.1, 1.0), (0.2, 0.0, 0.5),
                                             (1.0, 0.3, 2.0), (0.1, 0.05, 1.0)])
def test_hard_negative_matches_reference(t, tau_plus, beta):
    z1, z2 = make_pair(seed=1)
    check_against(
        lambda a, b: hard_negative_info_nce(a, b, temperature=t, tau_plus=tau_plus, beta=beta),
        lambda a, b: reference_hard_negative(a, b, t, tau_plus, beta), z1, z2)


def test_floor_is_active_and_matches_reference():
    # a large class prior with near-identical views pushes the debiased estimate below
    # the floor M e^{-1/t}
    z1, z2 = make_pair(n=5, seed=2, noise=0.01)
    t, tau_plus = 0.5, 0.9
    with torch.no_grad():
        z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
        s = z @ z.T / t
        pos = torch.exp(s[0, 5])
        neg = torch.exp(torch.cat([s[0, 1:5], s[0, 6:]])).sum()
    assert neg - tau_plus * 8 * pos < 8 * math.exp(-1 / t) * (1 - tau_plus)
    for beta in (0.0, 1.0):
        check_against(
            lambda a, b, be=beta: hard_negative_info_nce(a, b, temperature=t,
                                                         tau_plus=tau_plus, beta=be),
            lambda a, b, be=beta: reference_hard_negative(a, b, t, tau_plus, be), z1, z2)


@pytest.mark.parametrize("t", [0.5, 0.07])
def test_reduces_to_nt_xent(t):
    z1, z2 = make_pair(seed=3)
    for fn in (lambda a, b: hard_negative_info_nce(a, b, temperature=t, tau_plus=0.0, beta=0.0),
               lambda a, b: debiased_info_nce(a, b, temperature=t, tau_plus=0.0)):
        check_against(fn, lambda a, b: reference_nt_xent(a, b, t), z1, z2)


def test_beta_zero_is_debiased():
    z1, z2 = make_pair(seed=4)
    a = hard_negative_info_nce(z1, z2, temperature=0.3, tau_plus=0.2, beta=0.0)
    b = debiased_info_nce(z1, z2, temperature=0.3, tau_plus=0.2)
    assert torch.equal(a, b)


def test_exclude_matches_reference():
    z1, z2 = make_pair(n=6, seed=5)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    exclude = same_value_mask(labels.repeat(2), labels.repeat(2))
    for beta in (0.0, 1.5):
        check_against(
            lambda a, b, be=beta: hard_negative_info_nce(a, b, temperature=0.4, tau_plus=0.1,
                                                         beta=be, exclude=exclude),
            lambda a, b, be=beta: reference_hard_negative(a, b, 0.4, 0.1, be, exclude),
            z1, z2)


def test_exclude_of_self_and_partner_only_changes_nothing():
    z1, z2 = make_pair(n=5, seed=6)
    ids = torch.arange(5)
    exclude = same_value_mask(ids.repeat(2), ids.repeat(2))
    assert int(exclude.sum()) == 20     # the diagonal and the partners
    for beta in (0.0, 1.0):
        a = hard_negative_info_nce(z1, z2, beta=beta, exclude=exclude)
        b = hard_negative_info_nce(z1, z2, beta=beta)
        assert torch.allclose(a, b, rtol=1e-14, atol=0)


def test_excluding_every_negative_gives_zero():
    z1, z2 = make_pair(n=4, seed=7)
    exclude = torch.ones(8, 8, dtype=torch.bool)
    for beta in (0.0, 1.0):
        loss = hard_negative_info_nce(z1, z2, beta=beta, exclude=exclude)
        assert loss.item() == 0.0
        g = torch.autograd.grad(loss, (z1, z2))
        assert all(bool(torch.isfinite(x).all()) for x in g)


def test_consistent_permutation_and_view_swap_invariance():
    z1, z2 = make_pair(n=7, seed=8)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    for beta in (0.0, 1.0):
        a = hard_negative_info_nce(z1, z2, beta=beta)
        assert torch.allclose(a, hard_negative_info_nce(z1[perm], z2[perm], beta=beta),
                              rtol=1e-12, atol=0)
        assert torch.allclose(a, hard_negative_info_nce(z2, z1, beta=beta), rtol=1e-12, atol=0)


def test_low_temperature_float32_is_finite_and_accurate():
    z1, z2 = make_pair(n=8, d=4, seed=9, dtype=torch.float32)
    t = 0.005      # exp(1/t) = exp(200) overflows float32 without the row shift
    for beta in (0.0, 1.0):
        loss = hard_negative_info_nce(z1, z2, temperature=t, tau_plus=0.1, beta=beta)
        g = torch.autograd.grad(loss, (z1, z2))
        assert math.isfinite(loss.item())
        assert all(bool(torch.isfinite(x).all()) for x in g)
        want = hard_negative_info_nce(z1.detach().double(), z2.detach().double(),
                                      temperature=t, tau_plus=0.1, beta=beta)
        assert math.isclose(loss.item(), want.item(), rel_tol=1e-4)


def test_learnable_temperature_gets_a_gradient():
    z1, z2 = make_pair(seed=10)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss = debiased_info_nce(z1, z2, temperature=t, tau_plus=0.1)
    (gt,) = torch.autograd.grad(loss, (t,))
    want = reference_hard_negative(z1, z2, t, 0.1, 0.0)
    (wt,) = torch.autograd.grad(want, (t,))
    assert math.isclose(float(gt), float(wt), rel_tol=1e-9)


def test_same_value_mask():
    a = torch.tensor([1, 2, 1])
    b = torch.tensor([2, 1, 3, 1])
    want = torch.tensor([[False, True, False, True],
                         [True, False, False, False],
                         [False, True, False, True]])
    assert torch.equal(same_value_mask(a, b), want)
    assert same_value_mask(a, b).dtype == torch.bool


@pytest.mark.parametrize("a,b,name", [
    (torch.tensor([1.0, 2.0]), torch.tensor([1, 2]), "a_ids"),
    (torch.tensor([[1, 2]]), torch.tensor([1, 2]), "a_ids"),
    (torch.tensor(1), torch.tensor([1, 2]), "a_ids"),
    ([1, 2], torch.tensor([1, 2]), "a_ids"),
    (torch.tensor([1, 2]), torch.tensor([True, False]), "b_ids"),
    (torch.tensor([1, 2]), torch.tensor([1, 2], device="meta"), "b_ids"),
])
def test_same_value_mask_bad_inputs(a, b, name):
    with pytest.raises(ValueError, match=name):
        same_value_mask(a, b)


@pytest.mark.parametrize("kwargs,name", [
    ({"z1": torch.randn(4)}, "z1"),
    ({"z1": torch.randn(1, 3), "z2": torch.randn(1, 3)}, "z1"),
    ({"z2": torch.randn(4, 2)}, "z2"),
    ({"z2": torch.randn(4, 3, dtype=torch.float64)}, "z2"),
    ({"z2": torch.full((4, 3), float("nan"))}, "z2"),
    ({"z1": torch.ones(4, 3, dtype=torch.int64)}, "z1"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"tau_plus": 1.0}, "tau_plus"),
    ({"tau_plus": -0.1}, "tau_plus"),
    ({"tau_plus": float("nan")}, "tau_plus"),
    ({"beta": -1.0}, "beta"),
    ({"beta": float("inf")}, "beta"),
    ({"exclude": torch.zeros(4, 4, dtype=torch.bool)}, "exclude"),
    ({"exclude": torch.zeros(8, 8)}, "exclude"),
])
def test_bad_inputs_name_the_argument(kwargs, name):
    args = {"z1": torch.randn(4, 3), "z2": torch.randn(4, 3)}
    args.update(kwargs)
    z1, z2 = args.pop("z1"), args.pop("z2")
    with pytest.raises(ValueError, match=name):
        hard_negative_info_nce(z1, z2, **args)
    if "beta" not in args:
        with pytest.raises(ValueError, match=name):
            debiased_info_nce(z1, z2, **args)
