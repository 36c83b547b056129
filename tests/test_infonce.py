"""The InfoNCE family against references written straight from the papers."""

import math

import pytest
import torch
import torch.nn.functional as F

from nearfar.losses import (
    LogitScale,
    Temperature,
    clip_loss,
    cpc_loss,
    info_nce,
    moco_loss,
    nt_xent,
    partner_index,
    supcon,
)

# --------------------------------------------------------------------------- references
# Slow and obvious on purpose: float64, Python loops, one formula per paper.


def reference_info_nce(anchors, candidates, positives, exclude, t, similarity):
    # Khosla et al. 2020 (L_out): -1/|P(i)| sum_p log(exp(s_ip) / sum_{a scored} exp(s_ia))
    a, c = anchors.double(), candidates.double()
    if similarity == "cosine":
        a, c = F.normalize(a, dim=1), F.normalize(c, dim=1)
    n, m = len(a), len(c)
    total = 0.0
    for i in range(n):
        scored = [j for j in range(m) if not (
            (exclude == "self" and i == j)
            or (isinstance(exclude, torch.Tensor) and bool(exclude[i, j])))]
        if positives.dtype == torch.bool:
            pos = [j for j in scored if bool(positives[i, j])]
        else:
            pos = [int(positives[i])]
        denominator = sum(torch.exp(a[i] @ c[j] / t) for j in scored)
        total = total - sum(torch.log(torch.exp(a[i] @ c[p] / t) / denominator)
                            for p in pos) / len(pos)
    return total / n


def reference_nt_xent(z1, z2, t):
    # Chen et al. 2020: for each view, -log softmax of its partner over the 2N - 1 others
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    sim = z @ z.T / t
    n = len(z1)
    loss = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = torch.cat([sim[i, :i], sim[i, i + 1:]])
        loss = loss - (sim[i, j] - torch.logsumexp(others, 0))
    return loss / (2 * n)


def reference_supcon(z, labels, t):
    # Khosla et al. 2020, eq. 2: P(i) = same label without i, A(i) = everything but i
    z = F.normalize(z.double(), dim=1)
    n = len(z)
    loss = 0.0
    for i in range(n):
        others = [a for a in range(n) if a != i]
        log_denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / t for a in others]), 0)
        pos = [p for p in others if labels[p] == labels[i]]
        loss = loss - sum(z[i] @ z[p] / t - log_denominator for p in pos) / len(pos)
    return loss / n


def reference_clip(image, text, logit_scale):
    # Radford et al. 2021, Figure 3: symmetric cross-entropy over scaled cosine logits
    i_e = F.normalize(image.double(), dim=1)
    t_e = F.normalize(text.double(), dim=1)
    scale = logit_scale.double().exp().clamp(max=100)
    logits = i_e @ t_e.T * scale
    n = len(image)
    loss_i = sum(-torch.log_softmax(logits[k], 0)[k] for k in range(n)) / n
    loss_t = sum(-torch.log_softmax(logits[:, k], 0)[k] for k in range(n)) / n
    return (loss_i + loss_t) / 2


def reference_moco(q, k, queue, t):
    # He et al. 2020, Algorithm 1: logits = [q.k, q.queue] / t, label 0
    q = F.normalize(q.double(), dim=1)
    k = F.normalize(k.double(), dim=1).detach()
    queue = F.normalize(queue.double(), dim=1).detach()
    loss = 0.0
    for i in range(len(q)):
        logits = torch.cat([(q[i] @ k[i]).reshape(1), queue @ q[i]]) / t
        loss = loss - torch.log_softmax(logits, 0)[0]
    return loss / len(q)


def reference_cpc(predictions, targets, t):
    # van den Oord et al. 2018, eq. 4: per step k, item b against the B targets of step k
    b, steps, _ = predictions.shape
    p, z = predictions.double(), targets.double()
    loss = 0.0
    for k in range(steps):
        for i in range(b):
            f = torch.stack([torch.exp(p[i, k] @ z[j, k] / t) for j in range(b)])
            loss = loss - torch.log(f[i] / f.sum())
    return loss / (b * steps)


# --------------------------------------------------------------------------- helpers


def leaves(*shapes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def value_and_grads(fn, inputs):
    for x in inputs:
        x.grad = None
    value = fn(*inputs)
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def assert_matches(fn, ref, inputs, rtol=1e-10):
    value, grads = value_and_grads(fn, inputs)
    ref_value, ref_grads = value_and_grads(ref, inputs)
    assert value.dtype == inputs[0].dtype
    torch.testing.assert_close(value, ref_value.to(value.dtype), rtol=rtol, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=rtol, atol=rtol * float(r.abs().max()))


PATHS = [0, 3, 64]        # full matrix; tiles not dividing the batch; one tile


# --------------------------------------------------------------------------- against papers


@pytest.mark.parametrize("tile", PATHS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("kind", ["index", "mask", "index+self", "mask+self", "mask+exclude"])
def test_info_nce_matches_reference(kind, similarity, tile):
    anchors, candidates, t = leaves((7, 5), (9, 5), (), seed=1)
    with torch.no_grad():
        t.copy_(torch.tensor(0.7))
    g = torch.Generator().manual_seed(2)
    exclude = None
    if "self" in kind:
        exclude = "self"
    elif "exclude" in kind:
        exclude = torch.rand(7, 9, generator=g) < 0.3
    if kind.startswith("index"):
        positives = torch.tensor([1, 2, 3, 4, 5, 6, 0])
    else:
        positives = torch.rand(7, 9, generator=g) < 0.4
        positives[torch.arange(7), torch.arange(7) + 1] = True   # never self, never empty
        if isinstance(exclude, torch.Tensor):
            exclude[torch.arange(7), torch.arange(7) + 1] = False
    kw = dict(exclude=exclude, similarity=similarity)
    assert_matches(
        lambda a, c, t: info_nce(a, c, positives, temperature=t, tile=tile, **kw),
        lambda a, c, t: reference_info_nce(a, c, positives, exclude, t, similarity),
        [anchors, candidates, t])


@pytest.mark.parametrize("tile", PATHS)
def test_nt_xent_matches_simclr(tile):
    z1, z2, t = leaves((6, 4), (6, 4), (), seed=3)
    with torch.no_grad():
        t.fill_(0.5)
    assert_matches(lambda a, b, t: nt_xent(a, b, temperature=t, tile=tile),
                   reference_nt_xent, [z1, z2, t])


@pytest.mark.parametrize("tile", PATHS)
@pytest.mark.parametrize("with_exclude", [False, True])
def test_supcon_matches_khosla(tile, with_exclude):
    (z, t), labels = leaves((10, 4), (), seed=4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    with torch.no_grad():
        t.fill_(0.3)
    if not with_exclude:
        assert_matches(lambda z, t: supcon(z, labels, temperature=t, tile=tile),
                       lambda z, t: reference_supcon(z, labels, t), [z, t])
        return
    exclude = torch.zeros(10, 10, dtype=torch.bool)
    exclude[0, 3] = exclude[4, 7] = exclude[5, 1] = True       # a positive, negatives
    same = (labels[:, None] == labels[None]) & ~torch.eye(10, dtype=torch.bool) & ~exclude
    assert_matches(
        lambda z, t: supcon(z, labels, temperature=t, tile=tile, exclude=exclude),
        lambda z, t: reference_info_nce(z, z, same, exclude | torch.eye(10, dtype=torch.bool),
                                        t, "cosine"),
        [z, t])


@pytest.mark.parametrize("tile", PATHS)
def test_clip_loss_matches_radford(tile):
    image, text, logit_scale = leaves((5, 3), (5, 3), (), seed=5)
    with torch.no_grad():
        logit_scale.fill_(math.log(1 / 0.3))
    assert_matches(lambda i, x, s: clip_loss(i, x, s, tile=tile), reference_clip,
                   [image, text, logit_scale])


def test_clip_logit_scale_clamps_at_100():
    image, text, logit_scale = leaves((5, 3), (5, 3), (), seed=6)
    with torch.no_grad():
        logit_scale.fill_(7.0)                                # e^7 > 100
    value, grads = value_and_grads(clip_loss, [image, text, logit_scale])
    torch.testing.assert_close(value, reference_clip(image, text, logit_scale).detach())
    assert float(grads[2]) == 0.0                             # clamped: no gradient


def test_clip_accepts_logit_scale_module():
    image, text = leaves((5, 3), (5, 3), seed=7)
    module = LogitScale().double()
    assert float(module().detach()) == pytest.approx(1 / 0.07)
    loss = clip_loss(image, text, module)
    torch.testing.assert_close(loss, clip_loss(image, text, module.logit_scale))
    loss.backward()
    assert module.logit_scale.grad is not None and float(module.logit_scale.grad) != 0


@pytest.mark.parametrize("tile", [0, 3])
def test_moco_matches_he(tile):
    q, k, queue, t = leaves((4, 3), (4, 3), (11, 3), (), seed=8)
    with torch.no_grad():
        t.fill_(0.2)
    assert_matches(lambda q, k, u, t: moco_loss(q, k, u, temperature=t, tile=tile),
                   reference_moco, [q, k, queue, t])
    loss = moco_loss(q, k, queue, temperature=t)
    loss.backward()
    assert k.grad is None and queue.grad is None              # keys and queue are detached


@pytest.mark.parametrize("tile", PATHS)
def test_cpc_matches_van_den_oord(tile):
    predictions, targets, t = leaves((5, 3, 4), (5, 3, 4), (), seed=9)
    with torch.no_grad():
        t.fill_(1.5)
    assert_matches(lambda p, z, t: cpc_loss(p, z, temperature=t, tile=tile), reference_cpc,
                   [predictions, targets, t])


def test_learnable_temperature_module():
    z1, z2 = leaves((6, 4), (6, 4), dtype=torch.float32, seed=10)
    temperature = Temperature(0.2)
    assert float(temperature().detach()) == pytest.approx(0.2)
    nt_xent(z1, z2, temperature=temperature()).backward()
    assert float(temperature.log_temperature.grad) != 0


def test_float_temperature_equals_tensor_temperature():
    z1, z2 = leaves((6, 4), (6, 4), seed=11)
    torch.testing.assert_close(nt_xent(z1, z2, temperature=0.25),
                               nt_xent(z1, z2, temperature=torch.tensor(0.25).double()))


def test_half_precision_inputs_compute_in_float32():
    z1, z2 = leaves((6, 4), (6, 4), dtype=torch.bfloat16, seed=12)
    loss = nt_xent(z1, z2)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z1.grad.dtype == torch.bfloat16
    expected = nt_xent(z1.detach().float(), z2.detach().float())
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------- invariances, limits


@pytest.mark.parametrize("tile", [0, 4])
def test_permuting_the_batch_changes_nothing(tile):
    z1, z2 = leaves((9, 5), (9, 5), seed=13)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nt_xent(z1, z2, tile=tile), nt_xent(z1[perm], z2[perm], tile=tile))
    z, labels = torch.cat([z1, z2]), torch.arange(18) % 4
    perm = torch.randperm(18, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(supcon(z, labels, tile=tile),
                               supcon(z[perm], labels[perm], tile=tile))
    scale = torch.tensor(2.0).double()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(clip_loss(z1, z2, scale, tile=tile),
                               clip_loss(z1[perm], z2[perm], scale, tile=tile))


def test_scaling_embeddings_changes_nothing_under_cosine():
    z1, z2 = leaves((6, 4), (6, 4), seed=14)
    torch.testing.assert_close(nt_xent(z1, z2), nt_xent(3 * z1, 0.5 * z2))


@pytest.mark.parametrize("tile", [0, 3])
def test_aligned_separated_embeddings_give_zero_loss(tile):
    eye = torch.eye(8, dtype=torch.float64)
    assert float(nt_xent(eye, eye, temperature=0.01, tile=tile)) < 1e-30
    assert float(clip_loss(eye, eye, torch.tensor(math.log(100.0)).double(), tile=tile)) < 1e-30
    labels = torch.arange(8).repeat(2)
    assert float(supcon(torch.cat([eye, eye]), labels, temperature=0.01, tile=tile)) < 1e-30


@pytest.mark.parametrize("tile", [0, 3])
def test_identical_embeddings_give_log_of_the_choices(tile):
    z = torch.ones(6, 4, dtype=torch.float64)
    # 2N = 12 views, each sees 11 equal candidates
    assert float(nt_xent(z, z, tile=tile)) == pytest.approx(math.log(11), rel=1e-12)
    # every image sees 6 equal texts
    assert float(clip_loss(z, z, torch.tensor(1.0).double(), tile=tile)) == pytest.approx(
        math.log(6), rel=1e-12)
    # 12 samples, 3 labels: each positive holds 1/11 of the mass
    labels = torch.arange(12) % 3
    assert float(supcon(torch.ones(12, 4).double(), labels, tile=tile)) == pytest.approx(
        math.log(11), rel=1e-12)


def test_loss_is_cross_entropy_for_index_positives():
    anchors, candidates = leaves((5, 3), (8, 3), seed=15)
    index = torch.tensor([0, 7, 2, 2, 5])
    logits = anchors @ candidates.T / 0.3
    torch.testing.assert_close(
        info_nce(anchors, candidates, index, temperature=0.3, similarity="dot"),
        F.cross_entropy(logits, index))


def test_partner_index():
    assert partner_index(3).tolist() == [3, 4, 5, 0, 1, 2]
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        partner_index(0)


def test_exclude_self_with_fewer_anchors_than_candidates():
    anchors, candidates = leaves((3, 4), (7, 4), seed=16)
    index = torch.tensor([4, 5, 6])
    assert_matches(
        lambda a, c: info_nce(a, c, index, exclude="self", tile=2),
        lambda a, c: reference_info_nce(a, c, index, "self", 0.1, "cosine"),
        [anchors, candidates])


# --------------------------------------------------------------------------- bad input


def _bad(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_info_nce_rejects_bad_input():
    a, c = torch.randn(4, 3), torch.randn(6, 3)
    idx = torch.tensor([0, 1, 2, 3])
    _bad(lambda: info_nce(a.numpy(), c, idx), "anchors: expected a torch.Tensor")
    _bad(lambda: info_nce(a[0], c, idx), r"anchors: expected a 2-D tensor")
    _bad(lambda: info_nce(a, c[:1], idx), "candidates: expected at least 2 rows")
    _bad(lambda: info_nce(a, torch.randn(6, 5), idx), "candidates: expected 3 feature columns")
    _bad(lambda: info_nce(a, c.double(), idx), "candidates: expected dtype torch.float32")
    _bad(lambda: info_nce(a.long(), c, idx), "anchors: expected a floating-point tensor")
    nan = a.clone()
    nan[1, 1] = float("nan")
    _bad(lambda: info_nce(nan, c, idx), "anchors: expected finite values, got 1 NaN/Inf")
    _bad(lambda: info_nce(a, c, torch.tensor([0, 1, 2, 6])), r"positives: expected indices in")
    _bad(lambda: info_nce(a, c, torch.tensor([0, 1, 2])), r"positives: expected shape \(4,\)")
    _bad(lambda: info_nce(a, c, idx.float()), "positives: expected an integer tensor")
    _bad(lambda: info_nce(a, c, torch.ones(4, 6)), r"positives: expected an integer index")
    _bad(lambda: info_nce(a, c, torch.ones(4, 5, dtype=torch.bool)),
         r"positives: expected shape \(4, 6\)")
    _bad(lambda: info_nce(a, c, [0, 1, 2, 3]), "positives: expected a torch.Tensor")
    _bad(lambda: info_nce(a, c, idx, temperature=0), "temperature: expected a finite number > 0")
    _bad(lambda: info_nce(a, c, idx, temperature=-1.0), "temperature: expected a finite")
    _bad(lambda: info_nce(a, c, idx, temperature=torch.tensor([0.1, 0.2])),
         "temperature: expected a scalar")
    _bad(lambda: info_nce(a, c, idx, temperature=torch.tensor(1)),
         "temperature: expected a floating-point scalar")
    _bad(lambda: info_nce(a, c, idx, temperature="0.1"), "temperature: expected a number > 0")
    _bad(lambda: info_nce(a, c, idx, similarity="l2"), "similarity: expected 'cosine' or 'dot'")
    _bad(lambda: info_nce(a, c, idx, tile=-1), "tile: expected None")
    _bad(lambda: info_nce(a, c, idx, tile=2.5), "tile: expected None")
    _bad(lambda: info_nce(a, c, idx, tile=True), "tile: expected None")
    _bad(lambda: info_nce(a, c, idx, exclude="others"), "exclude: expected 'self'")
    _bad(lambda: info_nce(a, c, idx, exclude=torch.zeros(4, 4, dtype=torch.bool)),
         r"exclude: expected shape \(4, 6\)")
    _bad(lambda: info_nce(a, c, idx, exclude=torch.zeros(4, 6)),
         "exclude: expected a boolean tensor")
    _bad(lambda: info_nce(a, c, idx, exclude=1), "exclude: expected None, 'self'")
    _bad(lambda: info_nce(c, a, torch.arange(6) % 4, exclude="self"),
         "exclude: 'self' pairs anchor i with candidate i, so expected at most")


@pytest.mark.parametrize("tile", [0, 2])
def test_anchor_without_positive_is_an_error(tile):
    a, c = torch.randn(4, 3), torch.randn(6, 3)
    _bad(lambda: info_nce(a, c, torch.tensor([1, 1, 0, 0]), exclude="self", tile=tile),
         r"positives: .* got 1 anchors whose positive is excluded \(rows \[1\]\)")
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 1] = True
    _bad(lambda: info_nce(a, c, mask, exclude="self", tile=tile),
         r"positives: expected at least one non-excluded positive .* 3 anchors \(rows \[1, 2, 3\]")
    _bad(lambda: supcon(torch.randn(5, 3), torch.tensor([0, 0, 1, 1, 2]), tile=tile),
         r"labels: expected at least one non-excluded positive .* \(rows \[4\]\)")
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[0, 1] = True
    _bad(lambda: supcon(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), exclude=exclude, tile=tile),
         r"labels: .* \(rows \[0\]\)")


def test_special_cases_reject_bad_input():
    z = torch.randn(4, 3)
    _bad(lambda: nt_xent(z, torch.randn(4, 2)), r"z2: expected shape \(4, 3\) like z1")
    _bad(lambda: nt_xent(z, z, temperature=0.0), "temperature")
    _bad(lambda: clip_loss(z[:1], z[:1], torch.tensor(1.0)), "image: expected at least 2 rows")
    _bad(lambda: clip_loss(z, z, torch.tensor([1.0, 2.0])), "logit_scale: expected a scalar")
    _bad(lambda: clip_loss(z, z, torch.tensor(float("inf"))), "logit_scale: expected finite")
    _bad(lambda: clip_loss(z, z, "big"), "logit_scale: expected a finite number")
    _bad(lambda: supcon(z, torch.tensor([0, 0, 1])), r"labels: expected shape \(4,\)")
    _bad(lambda: supcon(z, torch.tensor([0.0, 0, 1, 1])), "labels: expected an integer tensor")
    _bad(lambda: supcon(z, torch.tensor([0, 0, 1, 1]), exclude="self"),
         "exclude: expected a torch.Tensor")
    _bad(lambda: supcon(z[:1], torch.tensor([0])), "z: expected at least 2 rows")
    _bad(lambda: moco_loss(z, z, torch.randn(5, 2)), "queue: expected 3 feature columns")
    _bad(lambda: moco_loss(z, z[:3], torch.randn(5, 3)), r"k: expected shape \(4, 3\) like q")
    _bad(lambda: moco_loss(z, z, torch.randn(5, 3), similarity="cos"), "similarity: expected")
    _bad(lambda: cpc_loss(z, z), r"predictions: expected a 3-D tensor \(B, K, D\)")
    _bad(lambda: cpc_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3)),
         "predictions: expected at least 2 items")
    _bad(lambda: cpc_loss(torch.randn(4, 2, 3), torch.randn(4, 3, 3)),
         r"targets: expected shape \(4, 2, 3\) like predictions")
    _bad(lambda: cpc_loss(torch.randn(4, 2, 3), torch.randn(4, 2, 3).double()),
         "targets: expected dtype torch.float32")
    _bad(lambda: cpc_loss(torch.randn(4, 2, 3), torch.randn(4, 2, 3), tile=-2), "tile")
