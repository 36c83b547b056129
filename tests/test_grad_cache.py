"""Cached gradients (GradCache, Gao et al., 2021): nearfar.methods.grad_cache and the
``grad_cache_chunk`` option of the two-view methods.

The reference is the plain computation with a graph: ``torch.cat([fn(c) for c in
x.split(k)])`` (the same chunks, so BatchNorm batch statistics and dropout draws are the
same as in the cached path), and, where the module is row-wise (no BatchNorm, no dropout),
``fn(x)`` on the whole batch.
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nearfar.data import ImageDataset, load_mnist5k
from nearfar.evaluate import embed_dataset, knn_accuracy
from nearfar.losses import nt_xent
from nearfar.methods import build_method
from nearfar.methods.grad_cache import cached_gradient_forward
from nearfar.train import TrainConfig, Trainer, seed_everything


def mlp(*, dropout: float = 0.0, batch_norm: bool = False, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(12, 32)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 8)]
    return nn.Sequential(*layers).to(dtype)


def objective(z: torch.Tensor) -> torch.Tensor:
    z1, z2 = z.float().chunk(2) if z.dtype == torch.bfloat16 else z.chunk(2)
    return nt_xent(z1, z2, temperature=0.3, tile=0)


def grads_of(model: nn.Module, x: torch.Tensor, chunk: int | None, *, seed: int = 5,
             reference: str = "chunks") -> dict[str, torch.Tensor]:
    """Parameter gradients of objective(model(x)): cached (chunk), plain per chunk with a
    graph (reference="chunks") or plain on the whole batch (reference="whole")."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if chunk is not None:
        z = cached_gradient_forward(model, x, chunk, module=model)
    elif reference == "chunks":
        z = torch.cat([model(c) for c in x.split(4)])
    else:
        z = model(x)
    objective(z).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def x64(n=24, seed=1):
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- equal to plain


def test_row_wise_module_gradients_equal_the_whole_batch_computation():
    model, x = mlp(), x64()
    assert_same(grads_of(model, x, chunk=5), grads_of(model, x, None, reference="whole"),
                rtol=1e-10, atol=1e-12)


def test_dropout_is_replayed_per_chunk():
    model, x = mlp(dropout=0.5), x64()
    plain = grads_of(model, x, None)                  # same 4-row chunks, with a graph
    cached = grads_of(model, x, chunk=4)
    assert_same(cached, plain, rtol=1e-10, atol=1e-12)
    # control: other dropout masks give clearly other gradients, so the match is not luck
    other = grads_of(model, x, None, seed=6)
    assert max((other[k] - plain[k]).abs().max() for k in plain) > 1e-3


def test_callers_random_stream_is_where_the_forward_pass_left_it():
    model, x = mlp(dropout=0.5), x64()
    torch.manual_seed(3)
    z = torch.cat([model(c) for c in x.split(4)])
    objective(z).backward()
    expected = torch.rand(3)
    torch.manual_seed(3)
    objective(cached_gradient_forward(model, x, 4, module=model)).backward()
    assert torch.equal(torch.rand(3), expected)


def test_batch_norm_gradients_equal_per_chunk_batch_norm():
    # BatchNorm batch statistics are per chunk (as in Gao et al.); with the same chunks
    # the gradients equal the plain computation
    model, x = mlp(batch_norm=True, dropout=0.2), x64()
    assert_same(grads_of(model, x, chunk=4), grads_of(model, x, None), rtol=1e-10,
                atol=1e-12)


def test_input_gradient_when_the_input_needs_one():
    model = mlp()
    x = x64().requires_grad_(True)
    objective(cached_gradient_forward(model, x, 7, module=model)).backward()
    cached = x.grad.clone()
    x.grad = None
    objective(model(x)).backward()
    torch.testing.assert_close(cached, x.grad, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_is_re_entered_for_the_recompute():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
            return x

    model = nn.Sequential(mlp(dropout=0.3, dtype=torch.float32), Probe())
    x = x64().float()

    def run(chunk):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = (cached_gradient_forward(model, x, chunk, module=model) if chunk else
                 torch.cat([model(c) for c in x.split(4)]))
            assert z.dtype == torch.bfloat16
        objective(z).backward()          # as in the Trainer: backward outside autocast
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = run(None)
    seen.clear()
    cached = run(4)
    # 6 chunks without a graph, then 6 recomputes with one: all under autocast
    assert seen == [(False, True)] * 6 + [(True, True)] * 6
    assert_same(cached, plain, rtol=2e-2, atol=2e-3)
    # control: the fp32 gradients differ from both by more than that tolerance would hide
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    objective(torch.cat([model(c) for c in x.split(4)])).backward()
    fp32 = {n: p.grad for n, p in model.named_parameters()}
    assert any((fp32[k] - plain[k]).abs().max() > 0 for k in plain)


# ---------------------------------------------------------------- state and hooks


def test_batch_norm_running_statistics_are_updated_once_per_chunk():
    model, x = mlp(batch_norm=True), x64()
    twin = copy.deepcopy(model)
    objective(cached_gradient_forward(model, x, 8, module=model)).backward()
    with torch.no_grad():                # what a single no-grad pass over the chunks does
        for c in x.split(8):
            twin(c)
    bn, ref = model[1], twin[1]
    assert int(bn.num_batches_tracked) == 3          # not 6: the recompute did not count
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=0)


def test_chunk_at_least_the_batch_is_the_plain_computation():
    model, x = mlp(batch_norm=True), x64()
    twin = copy.deepcopy(model)
    cached = grads_of(model, x, chunk=24)
    plain = grads_of(twin, x, None, reference="whole")
    assert_same(cached, plain, rtol=0, atol=0)
    assert torch.equal(model[1].running_mean, twin[1].running_mean)


def test_every_parameter_gradient_is_accumulated_once_per_backward():
    # DDP's all-reduce hooks sit where a parameter's gradient is accumulated: one
    # accumulation per parameter per backward pass means one all-reduce per step
    model, x = mlp(dropout=0.1), x64()
    count = {n: 0 for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, n=n: count.__setitem__(n, count[n] + 1))
    objective(cached_gradient_forward(model, x, 4, module=model)).backward()
    assert set(count.values()) == {1}
    for k in count:
        count[k] = 0
    for c in x.split(4):                 # control: a backward per chunk hits every hook 6 times
        model(c).sum().backward()
    assert set(count.values()) == {6}


def test_no_grad_callers_get_plain_embeddings():
    model, x = mlp(), x64()
    with torch.no_grad():
        z = cached_gradient_forward(model, x, 5, module=model)
    assert not z.requires_grad
    torch.testing.assert_close(z, model(x).detach())


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, "8"])
def test_bad_chunk_names_the_argument(chunk):
    model = mlp()
    with pytest.raises(ValueError, match="chunk: expected an integer >= 1"):
        cached_gradient_forward(model, x64(), chunk, module=model)
    with pytest.raises(ValueError, match="grad_cache_chunk: expected an integer >= 1"):
        build_method("simclr", encoder="small_cnn", grad_cache_chunk=chunk)


# ------------------------------------------------------------------------ SimCLR


def simclr(**kw):
    seed_everything(0)
    return build_method("simclr", encoder="small_cnn", hidden_dim=64, out_dim=32,
                        encoder_kwargs={"widths": (8, 16, 32), "strides": (1, 2, 2)}, **kw)


def test_simclr_with_grad_cache_matches_chunked_plain_forward():
    # SimCLR's encoder and head have BatchNorm: the reference embeds the same 16-row
    # chunks of the 2B views with a graph
    images = load_mnist5k().images[:32].float() / 255
    batch = {"images": F.avg_pool2d(images, 2), "labels": None, "index": torch.arange(32)}
    cached, plain = simclr(grad_cache_chunk=16), simclr()
    out = cached.loss(batch, torch.Generator().manual_seed(1))
    out.loss.backward()

    embed_views = plain.embed_views
    plain.embed_views = lambda fn, v: torch.cat([embed_views(fn, c) for c in v.split(16)])
    ref = plain.loss(batch, torch.Generator().manual_seed(1))
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    for (n, p), q in zip(cached.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert cached.describe()["encoder"]["grad_cache_chunk"] == 16


def test_simclr_trains_with_grad_cache_and_beats_random_init():
    ds = load_mnist5k()
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    small = F.avg_pool2d(ds.images.float(), 2).round().to(torch.uint8)
    train = ImageDataset(small[idx[:512]], ds.labels[idx[:512]])
    test = ImageDataset(small[idx[512:812]], ds.labels[idx[512:812]])
    method = simclr(grad_cache_chunk=32, temperature=0.2)   # 128 views, 4 chunks

    def knn():
        a, b = embed_dataset(method, train.images), embed_dataset(method, test.images)
        return float(knn_accuracy(a, train.labels, b, test.labels, k=10))

    before = knn()
    result = Trainer(method, train, TrainConfig(
        steps=100, batch_size=64, lr=1e-2, warmup_steps=2, progress=False,
        tensorboard=False, log_every=50)).fit()
    after = knn()
    print(f"SimCLR + grad cache: kNN {before:.3f} -> {after:.3f} ({result.train_time_s:.1f}s)")
    assert result.steps_run == 100
    assert after > before + 0.04, (before, after)   # measured 0.57 -> 0.65


def test_recipe_key_reaches_the_method():
    from nearfar.api import build_method_from_recipe
    from nearfar.recipe import load_recipe

    values = load_recipe(None, ["method.grad_cache_chunk=64"]).values
    method = build_method_from_recipe(values, (1, 28, 28))
    assert method.grad_cache_chunk == 64


# ------------------------------------------------------------------------ memory

# the resident set is sampled by a thread while the step runs (the process's peak RSS
# high-water mark cannot be used: importing torch can set it above the step's peak)
_PEAK = textwrap.dedent("""
    import os, sys, threading, time, torch
    from torch import nn
    from nearfar.methods.grad_cache import cached_gradient_forward
    torch.set_num_threads(1)
    chunk = int(sys.argv[1])
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.GELU(),
                          nn.Linear(1024, 16))
    x = torch.randn(16384, 64)
    base, peak, done = rss(), [0], threading.Event()
    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(2):
        z = cached_gradient_forward(model, x, chunk, module=model) if chunk else model(x)
        z.square().mean().backward()
        del z
    done.set()
    watcher.join()
    print((peak[0] - base) / 2**20)
""")


def test_peak_memory_is_lower_than_plain():
    # 16,384 rows through a 1,024-wide stack of element-wise layers: the plain graph keeps
    # ~5 activations of 64 MiB; chunks of 1,024 rows keep a sixteenth of that (fresh
    # processes, growth of the peak RSS; small weights, so activations dominate)
    def peak(chunk):
        # a fixed mmap threshold: glibc returns freed activations to the system at once
        # instead of keeping them in its heap (which would blur the two peaks)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, "-c", _PEAK, str(chunk)], capture_output=True,
                             text=True, check=True, env=env)
        return float(out.stdout.strip())

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm (Linux) to sample the resident set")
    plain, cached = peak(0), peak(1024)
    print(f"peak RSS growth: plain {plain:.0f} MiB, cached {cached:.0f} MiB")
    assert plain > 150, plain                      # ~5 activations of 64 MiB were live
    assert cached < 0.4 * plain, (plain, cached)      # measured 66 vs 330 MiB


# ------------------------------------------------------------------------ DDP


class _DDPStep(nn.Module):
    """A training step as DDP sees it: forward returns the loss of a 16-row batch."""

    def __init__(self, chunk):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Dropout(0.3), nn.Linear(32, 8))
        self.chunk = chunk

    def forward(self, x):
        z = cached_gradient_forward(self.net, x, self.chunk, module=self) if self.chunk \
            else torch.cat([self.net(c) for c in x.split(4)])
        return objective(z)


def _ddp_worker(rank, world, port, out_dir):
    import os

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = {}
    for chunk in (4, None):
        model = _DDPStep(chunk)
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        calls = []

        def counting(state, bucket, calls=calls):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting)
        for step in range(2):
            ddp.zero_grad()
            x = torch.randn(16, 12, generator=torch.Generator().manual_seed(10 * rank + step))
            torch.manual_seed(100 + rank + step)
            ddp(x).backward()
        result[str(chunk)] = {"grads": {n: p.grad for n, p in model.named_parameters()},
                              "allreduces": len(calls)}
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_one_allreduce_per_step_and_plain_gradients(tmp_path):
    # two gloo processes; a gradient bucket all-reduce per chunk would show as 4 x the
    # calls, and a parameter accumulated twice would make DDP raise
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        cached, plain = r["4"], r["None"]
        assert cached["allreduces"] == plain["allreduces"] == 2   # one bucket, two steps
        assert_same(cached["grads"], plain["grads"], rtol=1e-4, atol=1e-6)
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt")["4"]["grads"] for k in (0, 1))
    assert_same(r0, r1, rtol=0, atol=0)          # averaged over the processes: identical
