"""The exact tiled path: same values and gradients as the full matrix, without holding it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from nearfar.losses import clip_loss, info_nce, nt_xent, supcon
from nearfar.losses.tiled import (
    TiledInfoNCE,
    TilePlan,
    count_tile_positives,
    tiled_info_nce,
    tiled_logsumexp_both_ways,
)


def leaves(*shapes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def value_and_grads(fn, inputs):
    value = fn(*inputs)
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def assert_tiled_equals_full(fn, inputs, tile, rtol):
    full, full_grads = value_and_grads(lambda *x: fn(*x, tile=0), inputs)
    tiled, tiled_grads = value_and_grads(lambda *x: fn(*x, tile=tile), inputs)
    assert abs(float(tiled - full)) <= rtol * abs(float(full)) + 1e-14
    for t, f in zip(tiled_grads, full_grads):
        assert float((t - f).norm()) <= rtol * float(f.norm()) + 1e-14


# --------------------------------------------------------------------------- the Function


def _plans(n, m):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(n, m, generator=g) < 0.4
    mask[:, 0] = True
    exclude = torch.rand(n, m, generator=g) < 0.2
    exclude[:, 0] = exclude[:, 1] = False
    labels = torch.arange(n) % 2
    cand_labels = torch.arange(m) % 2
    index = (torch.arange(n) + 1) % m
    exclude[torch.arange(n), index] = False
    yield TilePlan(rows=2, cols=3)
    yield TilePlan(rows=2, cols=3, exclude_self=True)
    yield TilePlan(rows=3, cols=2, exclude_mask=exclude)
    yield TilePlan(rows=2, cols=3, exclude_self=True, positive_index=index)
    yield TilePlan(rows=3, cols=2, exclude_mask=exclude, positive_index=index)
    for plan in (TilePlan(rows=2, cols=2, positive_mask=mask, exclude_self=True),
                 TilePlan(rows=4, cols=3, anchor_labels=labels, candidate_labels=cand_labels,
                          exclude_mask=exclude)):
        counts = count_tile_positives(plan, n, m, torch.device("cpu"))
        yield TilePlan(**{**plan.__dict__, "positive_counts": counts})


@pytest.mark.parametrize("plan", list(_plans(5, 7)), ids=lambda p: "plan")
def test_gradcheck(plan):
    a, c, scale = leaves((5, 3), (7, 3), (), seed=1)
    with torch.no_grad():
        scale.fill_(1.3)
    assert torch.autograd.gradcheck(lambda a, c, s: tiled_info_nce(a, c, s, plan), (a, c, scale))


@pytest.mark.parametrize("plan", list(_plans(7, 7)), ids=lambda p: "plan")
@pytest.mark.parametrize("tile", [2, 3, 7])
def test_gradcheck_symmetric(plan, tile):
    # one tensor on both sides takes SymmetricTiledInfoNCE (square tiles); masks asymmetric
    (z, scale) = leaves((7, 3), (), seed=2)
    plan = TilePlan(**{**plan.__dict__, "rows": tile, "cols": tile})
    assert torch.autograd.gradcheck(lambda z, s: tiled_info_nce(z, z, s, plan), (z, scale))
    # and agrees with the general Function fed the same tensor twice
    general = TiledInfoNCE.apply(z, z, scale, plan)
    torch.testing.assert_close(tiled_info_nce(z, z, scale, plan), general, rtol=1e-12, atol=0)


@pytest.mark.parametrize("size", [2, 3, 8])
@pytest.mark.parametrize("matched", [False, True])
def test_gradcheck_both_ways(size, matched):
    m = 5 if matched else 7
    a, c, scale = leaves((5, 3), (m, 3), (), seed=3)

    def both(a, c, s):
        rows, cols = tiled_logsumexp_both_ways(a, c, s, size, matched=matched)
        return rows.sin().sum() + cols.cos().sum()     # distinct weights per output

    assert torch.autograd.gradcheck(both, (a, c, scale))
    assert torch.autograd.gradcheck(       # the other output's gradient is None
        lambda a, c, s: tiled_logsumexp_both_ways(a, c, s, size, matched=matched)[1],
        (a, c, scale))
    rows, cols = tiled_logsumexp_both_ways(a, c, scale, size, matched=matched)
    scores = scale * a @ c.T
    diagonal = scores.diagonal() if matched else 0
    torch.testing.assert_close(rows, torch.logsumexp(scores, 1) - diagonal, rtol=1e-12, atol=0)
    torch.testing.assert_close(cols, torch.logsumexp(scores, 0) - diagonal, rtol=1e-12, atol=0)


def test_index_positive_cancels_like_cross_entropy():
    # nearly one-hot softmax: G = softmax - 1 must cancel inside the tile, not across two
    # separately rounded terms (float32, temperature 0.01, positives almost identical)
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(600, 64, generator=g)
    z2 = (z1 + 1e-3 * torch.randn(600, 64, generator=g)).requires_grad_()
    z1.requires_grad_()
    grads = {}
    for tile in (0, 128):
        loss = nt_xent(z1, z2, temperature=0.01, tile=tile)
        grads[tile] = torch.autograd.grad(loss, (z1, z2))
    for full, tiled in zip(grads[0], grads[128]):
        assert float((tiled - full).abs().max()) <= 1e-5 * float(full.abs().max()) + 1e-12


def test_function_returns_per_anchor_log_sum_exp():
    a, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64)
    out = tiled_info_nce(a, c, scale, TilePlan(rows=2, cols=4))
    torch.testing.assert_close(out, torch.logsumexp(2 * a @ c.T, 1), rtol=1e-12, atol=0)


def test_function_is_stable_for_huge_scores():
    # dot products of several hundred: a naive exp overflows; the online max must not
    a, c = 30 * torch.randn(6, 4, dtype=torch.float64), 30 * torch.randn(10, 4, dtype=torch.float64)
    scale = torch.tensor(1.0, dtype=torch.float64)
    out = tiled_info_nce(a, c, scale, TilePlan(rows=4, cols=3, exclude_self=True))
    ref = torch.logsumexp((a @ c.T).fill_diagonal_(float("-inf")), 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- tiled == full


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 23), extra=st.integers(0, 9), d=st.integers(2, 6),
       tile=st.integers(1, 11), kind=st.sampled_from(["index", "mask", "self", "exclude"]),
       same=st.booleans(), seed=st.integers(0, 2**16))
def test_info_nce_tiled_equals_full_float64(n, extra, d, tile, kind, same, seed):
    # same: one tensor as anchors and candidates (the symmetric tiled Function)
    m = n if same else n + extra
    a, c, t = leaves((n, d), (m, d), (), seed=seed)
    with torch.no_grad():
        t.fill_(0.4)
    g = torch.Generator().manual_seed(seed)
    index = (torch.arange(n) + 1) % m
    exclude = None
    positives = index
    if kind == "mask":
        positives = torch.rand(n, m, generator=g) < 0.3
        positives[torch.arange(n), index] = True
    elif kind == "self":
        exclude = "self"
    elif kind == "exclude":
        exclude = torch.rand(n, m, generator=g) < 0.3
        exclude[torch.arange(n), index] = False
    if same:
        assert_tiled_equals_full(
            lambda a, t, tile: info_nce(a, a, positives, exclude=exclude, temperature=t,
                                        tile=tile),
            [a, t], tile, 1e-10)
        return
    assert_tiled_equals_full(
        lambda a, c, t, tile: info_nce(a, c, positives, exclude=exclude, temperature=t,
                                       tile=tile),
        [a, c, t], tile, 1e-10)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(4, 40), classes=st.integers(1, 4), tile=st.integers(1, 17),
       with_exclude=st.booleans(), seed=st.integers(0, 2**16))
def test_supcon_tiled_equals_full_float64(n, classes, tile, with_exclude, seed):
    (z, t), g = leaves((n, 3), (), seed=seed), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t.fill_(0.2)
    k = min(classes, n // 2)
    labels = torch.arange(n) % k
    exclude = None
    if with_exclude:       # drop some pairs but keep one same-label partner, k rows away
        exclude = torch.rand(n, n, generator=g) < 0.2
        i = torch.arange(n)
        exclude[i, torch.where(i + k < n, i + k, i - k)] = False
    assert_tiled_equals_full(
        lambda z, t, tile: supcon(z, labels, temperature=t, exclude=exclude, tile=tile),
        [z, t], tile, 1e-10)


@pytest.mark.parametrize("n, tile", [(300, 64), (257, 100), (512, 512)])
def test_nt_xent_tiled_equals_full_float32(n, tile):
    z1, z2, t = leaves((n, 32), (n, 32), (), dtype=torch.float32, seed=n)
    with torch.no_grad():
        t.fill_(0.1)
    assert_tiled_equals_full(lambda a, b, t, tile: nt_xent(a, b, temperature=t, tile=tile),
                             [z1, z2, t], tile, 1e-5)


def test_supcon_tiled_equals_full_float32():
    (z, t), labels = leaves((600, 32), (), dtype=torch.float32, seed=3), torch.arange(600) % 7
    with torch.no_grad():
        t.fill_(0.1)
    assert_tiled_equals_full(lambda z, t, tile: supcon(z, labels, temperature=t, tile=tile),
                             [z, t], 128, 1e-5)


def test_clip_tiled_equals_full_float32():
    image, text, logit_scale = leaves((700, 32), (700, 32), (), dtype=torch.float32, seed=6)
    with torch.no_grad():
        logit_scale.fill_(4.0)
    assert_tiled_equals_full(lambda i, t, s, tile: clip_loss(i, t, s, tile=tile),
                             [image, text, logit_scale], 128, 1e-5)


def test_automatic_choice_matches_both_paths():
    z1, z2 = leaves((40, 8), (40, 8), seed=4)
    auto = nt_xent(z1, z2)
    torch.testing.assert_close(auto, nt_xent(z1, z2, tile=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(auto, nt_xent(z1, z2, tile=7), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- memory


def _largest_allocation(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("kind", ["nt_xent", "supcon", "clip"])
def test_tiled_path_never_allocates_the_score_matrix(kind):
    n, d, tile = 512, 16, 256            # 2N = 1024: the score matrix would be 4 MiB
    z1, z2 = leaves((n, d), (n, d), dtype=torch.float32, seed=5)
    labels = torch.arange(2 * n) % 10
    if kind == "nt_xent":
        def loss(tile):
            return nt_xent(z1, z2, tile=tile)
    elif kind == "supcon":
        def loss(tile):
            return supcon(torch.cat([z1, z2]), labels, tile=tile)
    else:
        z1, z2 = leaves((2 * n, d), (2 * n, d), dtype=torch.float32, seed=6)

        def loss(tile):
            return clip_loss(z1, z2, torch.tensor(2.0), tile=tile)
    score_matrix = (2 * n) ** 2 * 4
    assert _largest_allocation(lambda: loss(0).backward()) >= score_matrix   # the probe works
    largest = _largest_allocation(lambda: loss(tile).backward())
    # at most two tiles (a tile and its mirror) or a few copies of the embeddings
    assert largest <= max(2 * tile * tile * 4, 2 * n * d * 8) < score_matrix / 4, largest
