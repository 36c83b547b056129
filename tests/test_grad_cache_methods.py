"""``grad_cache_chunk`` in every two-view method beyond SimCLR (nearfar.methods.grad_cache).

Each method is built twice from one seed, in float64, and its loss and parameter
gradients with cached gradients are compared with the plain computation on the same batch
and the same views:

* BatchNorm layers in eval mode (running statistics): the networks are row-wise, so the
  reference is ``grad_cache_chunk=None`` itself, embedding everything at once;
* training mode (batch statistics): the reference embeds the same chunks with a graph
  (as the SimCLR test in ``test_grad_cache.py`` does), since statistics are per chunk.

The online encoder must see at most k rows per pass; the momentum (key / target / teacher)
branch runs under no_grad, unchunked.
"""

import math
from importlib import resources

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from nearfar.api import build_method_from_recipe
from nearfar.data import ImageDataset
from nearfar.methods import build_method
from nearfar.nn.momentum import EMA
from nearfar.recipe import load_recipe
from nearfar.train import TrainConfig, Trainer, seed_everything

CHUNK = 5
SMALL = {
    "supcon": dict(hidden_dim=16, out_dim=8),
    "supcon_mixed": dict(hidden_dim=16, out_dim=8, labelled_fraction=0.5),
    "barlow_twins": dict(hidden_dim=16, out_dim=16),
    "vicreg": dict(hidden_dim=16, out_dim=16),
    "byol": dict(hidden_dim=16, out_dim=8, predictor_hidden_dim=16),
    "simsiam": dict(hidden_dim=16, out_dim=16, predictor_hidden_dim=8),
    "moco_v2": dict(queue_size=16, hidden_dim=16, out_dim=8),
    "moco_v3": dict(hidden_dim=16, out_dim=8, predictor_hidden_dim=16),
    "dino": dict(hidden_dim=16, bottleneck_dim=8, num_prototypes=16, local_crops=2,
                 local_scale=(0.3, 0.6), head_batch_norm=True),
}
METHODS = list(SMALL)


def build(name, chunk, *, eval_bn=False, double=True):
    seed_everything(0)
    m = build_method(name, encoder="small_cnn", grad_cache_chunk=chunk,
                     encoder_kwargs={"widths": (4, 8), "strides": (1, 2)}, **SMALL[name])
    if not double:
        return m
    m.double()              # the objectives themselves run in float32 (.float()), as does
    if name == "moco_v2":   # the queue and DINO's center with them
        m.queue.float()
    if name == "dino":
        m.dino.float()
    if eval_bn:
        for mod in m.modules():
            if isinstance(mod, _BatchNorm):
                mod.eval()
    return m


def batch(n=7):
    # 7 images: 14 views in chunks of 5, 5, 4; MoCo v2's 7 queries in 5, 2 (a chunk of one
    # row would fail in training-mode BatchNorm, as a batch of one does)
    g = torch.Generator().manual_seed(2)
    return {"images": torch.rand(n, 1, 10, 10, generator=g, dtype=torch.float64),
            "index": torch.arange(n), "labels": torch.arange(n) % 3}


def run(method):
    """Loss, parameter gradients, and what the online encoder and any momentum copy saw:
    (rows, grad enabled) per forward pass."""
    seen = {"online": [], "momentum": []}

    def hook(key):
        return lambda _m, args: seen[key].append((args[0].shape[0], torch.is_grad_enabled()))

    handles = [method.encoder.register_forward_pre_hook(hook("online"))]
    handles += [m.register_forward_pre_hook(hook("momentum")) for m in method.modules()
                if isinstance(m, EMA)]
    method.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    out = method.loss(batch(), torch.Generator().manual_seed(1))
    out.loss.backward()
    for h in handles:
        h.remove()
    grads = {n: None if p.grad is None else p.grad.clone()
             for n, p in method.named_parameters()}
    return out.loss.detach(), grads, seen


def assert_same_gradients(cached, plain):
    assert cached.keys() == plain.keys()
    for n in plain:
        assert (cached[n] is None) == (plain[n] is None), n
        if plain[n] is not None:
            torch.testing.assert_close(cached[n], plain[n], rtol=1e-9, atol=1e-12, msg=n)
    assert plain["encoder.features.0.0.weight"].abs().max() > 0   # a real gradient


def check_chunked(name, seen):
    online, momentum = seen["online"], seen["momentum"]
    assert max(rows for rows, _ in online) <= CHUNK, online
    assert any(grad for _, grad in online), online    # the recompute, with a graph
    # the momentum branch: no graph, the whole batch (2B views, or B keys in MoCo v2)
    assert momentum == ([] if name in ("supcon", "supcon_mixed", "barlow_twins", "vicreg",
                                       "simsiam")
                        else [(7 if name == "moco_v2" else 14, False)]), momentum


@pytest.mark.parametrize("name", METHODS)
def test_grad_cache_equals_the_whole_batch_with_eval_batch_norm(name):
    cached, plain = build(name, CHUNK, eval_bn=True), build(name, None, eval_bn=True)
    loss_c, grads_c, seen = run(cached)
    loss_p, grads_p, seen_p = run(plain)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-10, atol=1e-12)
    assert_same_gradients(grads_c, grads_p)
    check_chunked(name, seen)
    assert max(rows for rows, _ in seen_p["online"]) > CHUNK      # control: not chunked
    assert cached.describe()["encoder"]["grad_cache_chunk"] == CHUNK
    assert "grad_cache_chunk" not in plain.describe()["encoder"]


@pytest.mark.parametrize("name", METHODS)
def test_grad_cache_equals_chunked_plain_forward_with_batch_statistics(name):
    # training-mode BatchNorm: statistics per chunk, so the reference embeds the same
    # chunks with a graph
    cached, plain = build(name, CHUNK, eval_bn=False), build(name, None, eval_bn=False)
    embed_views = plain.embed_views
    plain.embed_views = lambda fn, v: torch.cat([embed_views(fn, c) for c in v.split(CHUNK)])
    loss_c, grads_c, seen = run(cached)
    loss_p, grads_p, _ = run(plain)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-10, atol=1e-12)
    assert_same_gradients(grads_c, grads_p)
    check_chunked(name, seen)
    # running statistics: once per chunk (the recompute leaves them alone), as the plain
    # chunked passes
    for (n, b), c in zip(cached.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-14, msg=n)


@pytest.mark.parametrize("name", METHODS)
def test_recipe_key_reaches_the_method(name):
    path = resources.files("nearfar.recipes").joinpath(f"{name}.toml")
    values = load_recipe(str(path), ["method.grad_cache_chunk=64"]).values
    method = build_method_from_recipe(values, (1, 28, 28))
    assert method.grad_cache_chunk == 64
    assert method.describe()["encoder"]["grad_cache_chunk"] == 64


@pytest.mark.parametrize("name", METHODS)
def test_bf16_channels_last_steps_through_the_trainer(name):
    # 8 images: 16 views in chunks of 5, 5, 5, 1 would break training-mode BatchNorm, so 6:
    # 6, 6, 4 (MoCo v2's 8 queries: 6, 2); the recompute re-enters autocast
    x = torch.rand(16, 1, 10, 10, generator=torch.Generator().manual_seed(0)) * 255
    data = ImageDataset(x.to(torch.uint8), torch.arange(16) % 3)
    result = Trainer(build(name, 6, double=False), data, TrainConfig(
        steps=2, batch_size=8, lr=1e-2, warmup_steps=1, progress=False, tensorboard=False,
        precision="bf16", channels_last=True, collapse_std=0)).fit()
    assert result.steps_run == 2 and math.isfinite(result.final_loss)
