import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nearfar.losses import sigmoid
from nearfar.losses.sigmoid import SigLipParams, SigLipTiled, siglip_loss


def reference_siglip(image, text, log_scale, bias):
    # Zhai et al. 2023, straight from the paper: every pair is a binary problem,
    # z_ij = +1 on the diagonal, -1 elsewhere; loss = -1/N sum_i sum_j log sigmoid(z_ij l_ij)
    x = image / image.norm(dim=1, keepdim=True)
    y = text / text.norm(dim=1, keepdim=True)
    t = log_scale.exp()
    n = len(x)
    loss = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = t * torch.dot(x[i], y[j]) + bias
            loss = loss - torch.log(1 / (1 + torch.exp(-z * logit)))
    return loss / n


LOG_10 = math.log(10.0)


def make_inputs(n, d, dtype=torch.float64, seed=0, scale=LOG_10, bias=-10.0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    text = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    log_scale = torch.tensor(scale, dtype=dtype, requires_grad=True)
    b = torch.tensor(bias, dtype=dtype, requires_grad=True)
    return image, text, log_scale, b


def value_and_grads(fn, inputs):
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), [g.detach() for g in grads]


def assert_close_rel(a, b, rel):
    # relative to the largest entry; the floor covers gradients that are exactly zero in
    # exact arithmetic (e.g. through the normalisation of 1-D embeddings)
    scale = max(float(b.abs().max()), 1e-6)
    assert float((a - b).abs().max()) <= rel * scale, (a, b)


@pytest.mark.parametrize("tile", [0, 2, 3, 7])
@pytest.mark.parametrize("scale,bias", [(math.log(10.0), -10.0), (0.5, 0.3)])
def test_matches_reference_values_and_gradients(tile, scale, bias):
    inputs = make_inputs(7, 4, scale=scale, bias=bias)
    got, got_g = value_and_grads(lambda *a: siglip_loss(*a, tile=tile), inputs)
    want, want_g = value_and_grads(reference_siglip, inputs)
    assert_close_rel(got, want, 1e-12)
    for a, b in zip(got_g, want_g):
        assert_close_rel(a, b, 1e-10)


def test_gradcheck_tiled_function():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    for tile in (2, 3):     # 5 rows: the last tile is partial
        assert torch.autograd.gradcheck(lambda *a, t=tile: SigLipTiled.apply(*a, t), (x, y, s, b))


def test_gradcheck_through_normalisation():
    inputs = make_inputs(6, 3, scale=0.2, bias=-1.0)
    assert torch.autograd.gradcheck(lambda *a: siglip_loss(*a, tile=4), inputs)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 23), d=st.integers(2, 6), tile=st.integers(1, 9),
       seed=st.integers(0, 10_000), scale=st.floats(-1.0, 3.0), bias=st.floats(-12.0, 4.0))
def test_tiled_equals_full_float64(n, d, tile, seed, scale, bias):
    inputs = make_inputs(n, d, seed=seed, scale=scale, bias=bias)
    full, full_g = value_and_grads(lambda *a: siglip_loss(*a, tile=0), inputs)
    tiled, tiled_g = value_and_grads(lambda *a: siglip_loss(*a, tile=tile), inputs)
    assert_close_rel(tiled, full, 1e-10)
    for a, b in zip(tiled_g, full_g):
        assert_close_rel(a, b, 1e-10)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(17, 90), tile=st.integers(3, 40), seed=st.integers(0, 10_000))
def test_tiled_equals_full_float32(n, tile, seed):
    inputs = make_inputs(n, 16, dtype=torch.float32, seed=seed)
    full, full_g = value_and_grads(lambda *a: siglip_loss(*a, tile=0), inputs)
    tiled, tiled_g = value_and_grads(lambda *a: siglip_loss(*a, tile=tile), inputs)
    assert tiled.dtype == torch.float32
    assert_close_rel(tiled, full, 1e-5)
    for a, b in zip(tiled_g, full_g):
        assert a.dtype == torch.float32
        assert_close_rel(a, b, 1e-5)


def test_automatic_tiling_above_threshold(monkeypatch):
    calls = []
    real_apply = SigLipTiled.apply

    def spy(*args):
        calls.append(args[-1])
        return real_apply(*args)

    monkeypatch.setattr(sigmoid, "AUTO_TILE_ABOVE", 5)
    monkeypatch.setattr(sigmoid, "AUTO_TILE_SIZE", 2)
    monkeypatch.setattr(SigLipTiled, "apply", spy)
    inputs = make_inputs(6, 3)
    auto, auto_g = value_and_grads(siglip_loss, inputs)
    assert calls == [2]
    full, full_g = value_and_grads(lambda *a: siglip_loss(*a, tile=0), inputs)
    assert calls == [2]
    assert_close_rel(auto, full, 1e-12)
    small = make_inputs(5, 3)
    siglip_loss(*small)
    assert calls == [2]


def test_only_some_inputs_need_grad():
    image, text, s, b = make_inputs(6, 3)
    loss = siglip_loss(image, text.detach(), s.detach(), b, tile=4)
    gi, gb = torch.autograd.grad(loss, (image, b))
    want = reference_siglip(image, text.detach(), s.detach(), b)
    wi, wb = torch.autograd.grad(want, (image, b))
    assert_close_rel(gi, wi, 1e-10)
    assert_close_rel(gb, wb, 1e-10)


def test_consistent_permutation_invariance():
    image, text, s, b = make_inputs(9, 4)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    for tile in (0, 4):
        a = siglip_loss(image, text, s, b, tile=tile)
        p = siglip_loss(image[perm], text[perm], s, b, tile=tile)
        assert torch.allclose(a, p, rtol=1e-12, atol=0)


def test_perfect_alignment_limit():
    # identical orthogonal pairs: diagonal logits s + b, off-diagonal b
    n = 4
    x = torch.eye(n, dtype=torch.float64)
    s, b = torch.tensor(math.log(20.0), dtype=torch.float64), torch.tensor(-10.0,
                                                                         dtype=torch.float64)
    want = (n * -math.log(torch.sigmoid(torch.tensor(10.0, dtype=torch.float64)))
            + (n * n - n) * -math.log(torch.sigmoid(torch.tensor(10.0, dtype=torch.float64))))
    for tile in (0, 3):
        got = siglip_loss(x, x, s, b, tile=tile)
        assert math.isclose(float(got), want / n, rel_tol=1e-12)


def test_python_numbers_are_constants():
    image, text, s, b = make_inputs(5, 3)
    got = siglip_loss(image, text, s.item(), b.item())
    assert torch.allclose(got, siglip_loss(image, text, s, b), rtol=1e-14)


def test_params_module_initialisation_and_forward():
    params = SigLipParams()
    assert math.isclose(float(params.logit_scale.detach().exp()), 10.0, rel_tol=1e-6)
    assert float(params.logit_bias.detach()) == -10.0
    assert {name for name, _ in params.named_parameters()} == {"logit_scale", "logit_bias"}
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    loss = params(image, text, tile=4)
    loss.backward()
    assert params.logit_scale.grad is not None and params.logit_bias.grad is not None
    want = siglip_loss(image, text, params.logit_scale, params.logit_bias, tile=0)
    assert torch.allclose(loss, want, rtol=1e-5)
    with pytest.raises(ValueError, match="init_scale"):
        SigLipParams(init_scale=0.0)
    with pytest.raises(ValueError, match="init_bias"):
        SigLipParams(init_bias=float("nan"))


def _good():
    return (torch.randn(4, 3), torch.randn(4, 3), torch.tensor(1.0), torch.tensor(-1.0))


@pytest.mark.parametrize("position,bad,name", [
    (0, [[1.0, 2.0]], "image"),
    (0, torch.randn(4), "image"),
    (0, torch.ones(4, 3, dtype=torch.long), "image"),
    (0, torch.randn(1, 3), "image"),
    (0, torch.full((4, 3), float("nan")), "image"),
    (1, torch.randn(4, 2), "text"),
    (1, torch.randn(5, 3), "text"),
    (1, torch.randn(4, 3, dtype=torch.float64), "text"),
    (1, torch.tensor([[float("inf")] * 3] * 4), "text"),
    (2, torch.ones(2), "logit_scale"),
    (2, torch.tensor(1.0, dtype=torch.float64), "logit_scale"),
    (2, torch.tensor(1.0, device="meta"), "logit_scale"),
    (2, torch.tensor(float("nan")), "logit_scale"),
    (2, "10", "logit_scale"),
    (3, torch.ones(1, 1, 1), "logit_bias"),
    (3, torch.tensor(float("-inf")), "logit_bias"),
    (3, float("nan"), "logit_bias"),
])
def test_bad_inputs_name_the_argument(position, bad, name):
    args = list(_good())
    args[position] = bad
    with pytest.raises(ValueError, match=name):
        siglip_loss(*args)


@pytest.mark.parametrize("tile", [-1, 1.5, True, "4"])
def test_bad_tile(tile):
    with pytest.raises(ValueError, match="tile"):
        siglip_loss(*_good(), tile=tile)


def test_tiled_float32_accuracy_in_the_trained_regime():
    # aligned pairs, a large scale: diagonal logits ~ +40, the loss is small and the
    # diagonal gradients are -sigmoid(-l) ~ 1e-17; compare against float64
    g = torch.Generator().manual_seed(5)
    image = torch.randn(150, 32, generator=g)
    text = image + 0.05 * torch.randn(150, 32, generator=g)
    base = [image, text, torch.tensor(math.log(50.0)), torch.tensor(-10.0)]
    want, want_g = value_and_grads(lambda *a: siglip_loss(*a, tile=0),
                                   [t.double().requires_grad_() for t in base])
    for tile in (0, 16, 64):
        got, got_g = value_and_grads(lambda *a, t=tile: siglip_loss(*a, tile=t),
                                     [t.clone().requires_grad_() for t in base])
        assert_close_rel(got.double(), want, 1e-5)
        for a, b in zip(got_g, want_g):
            assert_close_rel(a.double(), b, 1e-5)


def test_tiled_path_never_holds_the_full_matrix():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    n, d, tile = 96, 4, 16
    image, text, s, b = make_inputs(n, d)
    with LargestOutput():
        loss = siglip_loss(image, text, s, b, tile=tile)
        loss.backward()
    assert LargestOutput.largest <= max(tile * tile, n * d) < n * n
    with LargestOutput():
        siglip_loss(image, text, s, b, tile=0)
    assert LargestOutput.largest >= n * n
