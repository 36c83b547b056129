import math

import pytest
import torch

from nearfar.losses.distillation import DinoCenter, dino_loss, negative_cosine, update_center


def reference_negative_cosine(p, z):
    # BYOL / SimSiam: D(p, z) = -p/|p| . z/|z|, z a constant
    z = z.detach()
    total = 0.0
    for i in range(len(p)):
        total = total - torch.dot(p[i], z[i]) / (p[i].norm() * z[i].norm())
    return total / len(p)


def reference_dino(student, teacher, center, ts, tt):
    # DINO's reference loop (Caron et al. 2021): every teacher view against every other
    # student view, cross-entropy averaged over the batch, then over the pairs
    teacher_out = [torch.softmax((t.detach() - center) / tt, dim=-1) for t in teacher]
    student_out = [s / ts for s in student]
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v, s in enumerate(student_out):
            if v == iq:
                continue
            per_row = [-(q[n] * torch.log_softmax(s[n], dim=-1)).sum() for n in range(len(q))]
            total = total + torch.stack(per_row).mean()
            terms += 1
    return total / terms


def make_logits(v, n, k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(v, n, k, generator=g, dtype=dtype)).requires_grad_()


def test_negative_cosine_matches_reference():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    got = negative_cosine(p, z)
    want = reference_negative_cosine(p, z)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-12)
    (gp,) = torch.autograd.grad(got, (p,))
    (wp,) = torch.autograd.grad(want, (p,))
    assert torch.allclose(gp, wp, rtol=1e-10, atol=1e-14)


def test_negative_cosine_stops_the_target_gradient():
    p = torch.randn(4, 3, requires_grad=True)
    z = torch.randn(4, 3, requires_grad=True)
    negative_cosine(p, z).backward()
    assert p.grad is not None
    assert z.grad is None


def test_negative_cosine_limits():
    x = torch.randn(5, 4, dtype=torch.float64)
    assert math.isclose(negative_cosine(x, x).item(), -1.0, rel_tol=1e-12)
    assert math.isclose(negative_cosine(x, 3 * x).item(), -1.0, rel_tol=1e-12)
    assert math.isclose(negative_cosine(x, -x).item(), 1.0, rel_tol=1e-12)
    e = torch.eye(4, dtype=torch.float64)
    assert abs(negative_cosine(e, e.roll(1, dims=0)).item()) < 1e-15


def test_negative_cosine_permutation_invariance():
    p, z = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    perm = torch.randperm(7)
    assert torch.allclose(negative_cosine(p, z), negative_cosine(p[perm], z[perm]), rtol=1e-12)


@pytest.mark.parametrize("v_s,v_t", [(2, 2), (4, 2), (3, 1), (5, 3)])
def test_dino_matches_reference(v_s, v_t):
    student = make_logits(v_s, 4, 6, seed=v_s)
    teacher = make_logits(v_t, 4, 6, seed=10 + v_t)
    center = torch.randn(6, dtype=torch.float64)
    got = dino_loss(student, teacher, center, student_temperature=0.2, teacher_temperature=0.07)
    want = reference_dino(student, teacher, center, 0.2, 0.07)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-12)
    gs, gt = torch.autograd.grad(got, (student, teacher), allow_unused=True)
    (ws,) = torch.autograd.grad(want, (student,))
    assert torch.allclose(gs, ws, rtol=1e-10, atol=1e-14)
    assert gt is None     # the teacher gets no gradient


def test_dino_identical_teacher_and_student_is_the_entropy():
    # same logits for every view, no centering, equal temperatures: cross-entropy = entropy
    x = torch.randn(5, 8, dtype=torch.float64)
    views = x.expand(2, 5, 8)
    center = torch.zeros(8, dtype=torch.float64)
    got = dino_loss(views, views, center, student_temperature=0.5, teacher_temperature=0.5)
    p = torch.softmax(x / 0.5, dim=-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert math.isclose(got.item(), entropy.item(), rel_tol=1e-12)
    uniform = torch.zeros(2, 5, 8, dtype=torch.float64)
    got = dino_loss(uniform, uniform, center)
    assert math.isclose(got.item(), math.log(8), rel_tol=1e-12)


def test_dino_center_shift_of_the_student_changes_nothing():
    student, teacher = make_logits(3, 4, 5), make_logits(2, 4, 5, seed=1)
    center = torch.randn(5, dtype=torch.float64)
    a = dino_loss(student, teacher, center)
    b = dino_loss(student + 7.0, teacher + 2.0, center + 2.0)
    assert torch.allclose(a, b, rtol=1e-12)


def test_dino_batch_permutation_invariance():
    student, teacher = make_logits(4, 6, 5), make_logits(2, 6, 5, seed=1)
    center = torch.randn(5, dtype=torch.float64)
    perm = torch.randperm(6)
    a = dino_loss(student, teacher, center)
    b = dino_loss(student[:, perm], teacher[:, perm], center)
    assert torch.allclose(a, b, rtol=1e-12)


def test_update_center():
    teacher = make_logits(2, 5, 4)
    center = torch.randn(4, dtype=torch.float64)
    new = update_center(center, teacher, momentum=0.8)
    mean = teacher.detach().reshape(-1, 4).mean(0)
    assert torch.allclose(new, 0.8 * center + 0.2 * mean, rtol=1e-12)
    assert not new.requires_grad
    assert torch.equal(update_center(center, teacher, momentum=1.0), center)
    assert torch.allclose(update_center(center, teacher, momentum=0.0), mean, rtol=1e-12)
    assert new is not center


def test_dino_center_module():
    module = DinoCenter(4, momentum=0.5)
    student, teacher = torch.randn(3, 2, 4), torch.randn(2, 2, 4)
    loss = module(student, teacher)
    want = dino_loss(student, teacher, torch.zeros(4))
    assert torch.allclose(loss, want)
    assert torch.allclose(module.center, 0.5 * teacher.reshape(-1, 4).mean(0))
    assert "center" in module.state_dict()
    module.eval()
    before = module.center.clone()
    module(student, teacher)
    assert torch.equal(module.center, before)
    with pytest.raises(ValueError, match="num_prototypes"):
        DinoCenter(0)
    with pytest.raises(ValueError, match="momentum"):
        DinoCenter(4, momentum=1.5)


@pytest.mark.parametrize("kwargs,name", [
    ({"p": torch.randn(4)}, "p"),
    ({"p": "x"}, "p"),
    ({"z": torch.randn(4, 2)}, "z"),
    ({"z": torch.randn(3, 3)}, "z"),
    ({"z": torch.randn(4, 3, dtype=torch.float64)}, "z"),
    ({"z": torch.full((4, 3), float("nan"))}, "z"),
])
def test_negative_cosine_bad_inputs(kwargs, name):
    args = {"p": torch.randn(4, 3), "z": torch.randn(4, 3)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        negative_cosine(args["p"], args["z"])


@pytest.mark.parametrize("kwargs,name", [
    ({"student_logits": torch.randn(6, 5)}, "student_logits"),
    ({"student_logits": torch.randn(1, 3, 5)}, "student_logits"),
    ({"student_logits": torch.ones(3, 3, 5, dtype=torch.long)}, "student_logits"),
    ({"student_logits": torch.full((3, 3, 5), float("inf"))}, "student_logits"),
    ({"teacher_logits": torch.randn(2, 4, 5)}, "teacher_logits"),
    ({"teacher_logits": torch.randn(2, 3, 6)}, "teacher_logits"),
    ({"teacher_logits": torch.randn(4, 3, 5)}, "teacher_logits"),
    ({"teacher_logits": torch.randn(2, 3, 5, dtype=torch.float64)}, "teacher_logits"),
    ({"center": torch.zeros(1, 5)}, "center"),
    ({"center": torch.zeros(4)}, "center"),
    ({"center": torch.zeros(5, dtype=torch.float64)}, "center"),
    ({"center": torch.full((5,), float("nan"))}, "center"),
    ({"student_temperature": 0.0}, "student_temperature"),
    ({"teacher_temperature": -1.0}, "teacher_temperature"),
])
def test_dino_bad_inputs(kwargs, name):
    args = {"student_logits": torch.randn(3, 3, 5), "teacher_logits": torch.randn(2, 3, 5),
            "center": torch.zeros(5)}
    args.update(kwargs)
    s, t, c = args.pop("student_logits"), args.pop("teacher_logits"), args.pop("center")
    with pytest.raises(ValueError, match=name):
        dino_loss(s, t, c, **args)


@pytest.mark.parametrize("center,teacher,momentum,name", [
    (torch.zeros(5), torch.randn(3, 5), 0.9, "teacher_logits"),
    (torch.zeros(4), torch.randn(2, 3, 5), 0.9, "center"),
    (torch.zeros(5), torch.randn(2, 3, 5), 1.1, "momentum"),
    (torch.zeros(5), torch.randn(2, 3, 5), -0.1, "momentum"),
])
def test_update_center_bad_inputs(center, teacher, momentum, name):
    with pytest.raises(ValueError, match=name):
        update_center(center, teacher, momentum=momentum)
