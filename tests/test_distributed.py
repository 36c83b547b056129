"""Negatives from every rank, with gradients: 2 processes equal 1 process.

One ``torch.multiprocessing`` spawn starts 2 gloo processes. In each, a tiny float64 model
(Linear layers, no BatchNorm) embeds this rank's half of a batch, a loss with
``gather=True`` is backpropagated, and the parameter gradients are averaged over ranks
the way ``DistributedDataParallel`` does (all-reduce SUM, divide by the world size). Real
DDP gives the same gradients (``test_real_ddp_gives_the_same_gradients``, run with
``NEARFAR_TEST_DDP=1``: its constructor imports ``torch._dynamo``, 5 to 12 s per process
on a 2-core machine, which would triple this file's time). The same process also
computes the one-process loss on the concatenated batch (``gather=False``, no
collectives) with a fresh copy of the model.
Loss (the mean over ranks of what each rank returns) and every parameter gradient must
agree to 1e-6, for NT-Xent (full and tiled), CLIP, SupCon, SigLIP, Barlow Twins, VICReg,
MoCo v3's in-batch keys and the MoCo queue (contents and loss over two steps), with
``local_loss`` False and True.

The same harness is then pointed at the peer libraries' past bugs, patched into
`nearfar.distributed` inside the workers, and must fail for each:

* an all-gather whose backward returns this rank's slice of the gradient unsummed;
* an all-reduce outside autograd for batch statistics (gradients W times too small);
* positives offset by ``rank * n`` although nothing was gathered.

Workers write their measurements to JSON; the assertions run in the test process.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import nearfar.distributed as D
from nearfar.losses import (
    barlow_twins,
    clip_loss,
    moco_loss,
    nt_xent,
    siglip_loss,
    supcon,
    update_center,
    vicreg,
)
from nearfar.losses.collective import check_gather
from nearfar.nn.queue import Queue

WORLD = 2
N = 4           # rows per rank
D_IN = 5
D_OUT = 4
TOL = 1e-6
BUG_MIN = 1e-4  # a bug must move loss or gradients by clearly more than rounding

# ----------------------------------------------------------------------------- the model


class Towers(nn.Module):
    """One small tower per input (Linear - tanh - Linear, float64) plus the loss's own
    learnable scalars; forward returns the embeddings and the scalars, so that DDP sees
    every parameter used through its forward."""

    def __init__(self, inputs: int, scalars: dict[str, float]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.towers = nn.ModuleList()
        for _ in range(inputs):
            tower = nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, D_OUT))
            for p in tower.parameters():
                p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7
            self.towers.append(tower)
        self.scalars = nn.ParameterDict(
            {k: nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in scalars.items()})

    def forward(self, *xs):
        outs = [tower(x) for tower, x in zip(self.towers, xs)]
        return outs, {k: p * 1.0 for k, p in self.scalars.items()}


def batch(rows: int, seed: int, dim: int = D_IN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g, dtype=torch.float64)


def local(x: torch.Tensor) -> torch.Tensor:
    r = dist.get_rank()
    return x[r * N:(r + 1) * N]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (zeros for one that got none, e.g. a key tower)."""
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for name, p in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def mean_over_ranks(value: torch.Tensor) -> float:
    v = value.detach().clone().reshape(1)
    dist.all_reduce(v)
    return float(v) / dist.get_world_size()


class Averaged:
    """What DDP does to gradients, without DDP: after backward, every parameter's
    gradient is all-reduced (SUM) and divided by the world size."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *xs):
        return self.module(*xs)

    def average(self) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


USE_DDP = False     # set in the worker: real DistributedDataParallel instead of Averaged


def wrap(model: nn.Module):
    return DDP(model) if USE_DDP else Averaged(model)


def average(net) -> None:
    if isinstance(net, Averaged):
        net.average()


def compare(inputs: list[torch.Tensor], scalars: dict[str, float], loss_fn) -> dict:
    """loss_fn(outs, scalars, gather: bool) -> loss. One process on the concatenated
    batch (gather=False, a fresh model, no collectives) against this rank's half with
    gather=True and DDP-averaged gradients."""
    ref_model = Towers(len(inputs), scalars)
    outs, sc = ref_model(*inputs)
    ref_loss = loss_fn(outs, sc, False)
    ref_loss.backward()
    ref_grads = grads(ref_model)

    model = Towers(len(inputs), scalars)
    net = wrap(model)                # averages parameter gradients over ranks
    outs, sc = net(*[local(x) for x in inputs])
    loss = loss_fn(outs, sc, True)
    loss.backward()
    average(net)
    return {"loss": abs(mean_over_ranks(loss) - float(ref_loss.detach())),
            "grad": max_diff(grads(model), ref_grads),
            "grad_scale": max(float(g.abs().max()) for g in ref_grads.values())}


# ----------------------------------------------------------------------------- the cases


def contrastive_cases() -> dict:
    """name -> (inputs, scalars, loss_fn(outs, scalars, gather, local_loss))."""
    x1, x2, y = batch(WORLD * N, 1), batch(WORLD * N, 2), batch(WORLD * N, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 2, 3])       # global; each rank gets 4
    cases = {}
    for tile in (0, 3):
        cases[f"nt_xent/tile={tile}"] = (
            [x1, x2], {"log_t": math.log(0.5)},
            lambda o, s, g, ll, tile=tile: nt_xent(o[0], o[1], temperature=s["log_t"].exp(),
                                                   tile=tile, gather=g, local_loss=ll))
        cases[f"clip/tile={tile}"] = (
            [x1, y], {"logit_scale": math.log(5.0)},
            lambda o, s, g, ll, tile=tile: clip_loss(o[0], o[1], s["logit_scale"], tile=tile,
                                                     gather=g, local_loss=ll))
        cases[f"supcon/tile={tile}"] = (
            [x1, x2], {"log_t": math.log(0.3)},
            lambda o, s, g, ll, tile=tile: supcon(
                torch.cat([o[0], o[1]]), _view_labels(labels, len(o[0])),
                temperature=s["log_t"].exp(),
                tile=tile, gather=g, local_loss=ll))
        cases[f"siglip/tile={tile}"] = (
            [x1, y], {"logit_scale": math.log(3.0), "logit_bias": -1.0},
            lambda o, s, g, ll, tile=tile: siglip_loss(
                o[0], o[1], s["logit_scale"], s["logit_bias"], tile=tile, gather=g,
                local_loss=ll))
        cases[f"moco_v3_keys/tile={tile}"] = (
            [x1, x2], {"log_t": math.log(0.2)},
            lambda o, s, g, ll, tile=tile: _moco_v3(o, s, g, ll, tile))
    return cases


def _view_labels(labels: torch.Tensor, rows: int) -> torch.Tensor:
    """Labels of [z1; z2]: this rank's for a rank's rows, else the whole batch's."""
    own = local(labels) if rows == N else labels
    return own.repeat(2)


def _moco_v3(o, s, g, ll, tile):
    from nearfar.methods.moco import key_contrast

    # the second tower stands in for the momentum encoder: its output is a detached key
    t = s["log_t"].exp()
    return key_contrast(o[0], o[1].detach(), temperature=t, tile=tile, gather=g,
                        local_loss=ll) * (2 * 0.2)


def statistic_cases() -> dict:
    x1, x2 = batch(WORLD * N, 4), batch(WORLD * N, 5)
    return {
        "barlow_twins": ([x1, x2], {}, lambda o, s, g, ll: barlow_twins(
            o[0], o[1], lambda_offdiag=0.05, gather=g)),
        "vicreg": ([x1, x2], {}, lambda o, s, g, ll: vicreg(o[0], o[1], gather=g)),
    }


def run_cases(cases: dict, local_losses=(False, True)) -> dict:
    out = {}
    for name, (inputs, scalars, fn) in cases.items():
        for ll in local_losses:
            out[f"{name}/local_loss={ll}"] = compare(
                inputs, scalars, lambda o, s, g, fn=fn, ll=ll: fn(o, s, g, ll and g))
    return out


def moco_queue_case(patch_enqueue_gather: bool = True) -> dict:
    """Two MoCo v2 steps: queries through DDP, keys from a fixed key tower, a queue of 12
    (random initial keys), the second step's items repeating the first's so that the
    same-item exclusion is active. Queue contents after every step and loss / gradients
    of every step must match one process on the concatenated batches."""
    from nearfar.methods.moco import moco_loss_excluding

    key_tower = Towers(1, {})
    ids = torch.arange(WORLD * N)
    labels = torch.arange(WORLD * N) % 3
    xs = [(batch(WORLD * N, 10 + step), batch(WORLD * N, 20 + step)) for step in range(2)]

    def run(distributed: bool) -> tuple[list, list, Queue]:
        model = Towers(1, {})
        net = wrap(model) if distributed else model
        queue = Queue(12, D_OUT, init="random", seed=3).double()
        losses, grad_list = [], []
        for x_q, x_k in xs:
            model.zero_grad()
            xq, xk = (local(x_q), local(x_k)) if distributed else (x_q, x_k)
            own_ids = local(ids) if distributed else ids
            own_labels = local(labels) if distributed else labels
            (q,), _ = net(xq)
            with torch.no_grad():
                k = F.normalize(key_tower(xk)[0][0], dim=1)
            negatives = queue.get()
            exclude = queue.same_item_mask(own_ids)
            if bool(exclude.any()):
                loss = moco_loss_excluding(q, k, negatives, exclude, temperature=0.2)
            else:
                loss = moco_loss(q, k, negatives, temperature=0.2)
            loss.backward()
            if distributed:
                average(net)
            losses.append(mean_over_ranks(loss) if distributed else float(loss.detach()))
            grad_list.append(grads(model))
            queue.enqueue(k, own_labels, own_ids, gather=distributed and patch_enqueue_gather)
        return losses, grad_list, queue

    ref_losses, ref_grads, ref_queue = run(False)
    losses, grad_list, queue = run(True)
    # keys to rounding (a rank's key tower runs on N rows, the reference on W N: BLAS
    # may round differently); labels, ids, write position and fill count exactly
    same_queue = (float((queue.keys - ref_queue.keys).abs().max()) <= 1e-12
                  and torch.equal(queue.key_labels, ref_queue.key_labels)
                  and torch.equal(queue.key_ids, ref_queue.key_ids)
                  and int(queue.ptr) == int(ref_queue.ptr)
                  and int(queue.count) == int(ref_queue.count))
    return {"loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "grad": max(max_diff(a, b) for a, b in zip(grad_list, ref_grads)),
            "same_queue": same_queue}


def dino_center_case() -> dict:
    teacher = batch(2 * WORLD * N, 30, dim=6).view(2, WORLD * N, 6)
    center = torch.linspace(-1, 1, 6, dtype=torch.float64)
    ref = update_center(center, teacher, 0.9)
    own = teacher[:, dist.get_rank() * N:(dist.get_rank() + 1) * N]
    got = update_center(center, own, 0.9, gather=True)
    return {"center": float((got - ref).abs().max())}


def methods_case() -> dict:
    """The methods gather on their own (gather=None) once a process group runs: methods
    with a global objective return the same loss on every rank (each rank sees different
    images), MoCo v2's queue and DINO's center stay identical across ranks, and
    SupConMixed copes with ranks holding different numbers of labelled items."""
    from nearfar.methods import build_method

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if rank == 0 else torch.tensor([-1, 1, -1, 0, 2, -1])
    batch_ = {"images": torch.rand(6, 1, 10, 10, generator=g), "labels": labels,
              "index": torch.arange(6) + 6 * rank}
    small = {"encoder": "small_cnn", "encoder_kwargs": {"widths": (4,)}, "hidden_dim": 16}
    out = {}
    for name, kw in (("simclr", {"out_dim": 8}), ("barlow_twins", {"out_dim": 8}),
                     ("supcon_mixed", {"out_dim": 8}),
                     ("moco_v2", {"out_dim": 8, "queue_size": 24}),
                     ("dino", {"local_crops": 0, "num_prototypes": 8, "bottleneck_dim": 4})):
        torch.manual_seed(0)
        method = build_method(name, **small, **kw)
        loss = method.loss(dict(batch_), torch.Generator().manual_seed(rank)).loss
        loss.backward()
        state = {"loss": loss.detach().reshape(1).double()}
        if name == "moco_v2":
            state["queue"] = method.queue.keys.double()
        if name == "dino":
            state["center"] = method.dino.center.double()
        same = {}
        for key, value in state.items():
            parts = [torch.empty_like(value) for _ in range(WORLD)]
            dist.all_gather(parts, value.contiguous())
            same[key] = bool(torch.equal(parts[0], parts[1]))
        out[name] = same
    return out


# ----------------------------------------------------------------------------- the bugs


class _UnsummedGather(torch.autograd.Function):
    """Peer bug 1: the backward returns this rank's slice of the gradient, unsummed."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _unsummed_gather(x):
    return _UnsummedGather.apply(x)


def _all_reduce_without_autograd(x, op="sum"):
    """Peer bug 2: the statistic is all-reduced outside autograd; only the local share
    carries a gradient."""
    total = x.detach().clone()
    dist.all_reduce(total)
    if op == "mean":
        total /= dist.get_world_size()
    return x + (total - x).detach()


def _no_gather(x):
    return x


def bug_cases() -> dict:
    """Each bug patched into nearfar.distributed; the harness must report a mismatch."""
    out = {}
    contrastive = contrastive_cases()
    chosen = {k: contrastive[k] for k in ("nt_xent/tile=0", "nt_xent/tile=3", "clip/tile=0",
                                          "supcon/tile=0", "siglip/tile=3")}
    real_gather = D.all_gather_with_grad
    D.all_gather_with_grad = _unsummed_gather
    try:
        out["unsummed_gather"] = run_cases(chosen)
    finally:
        D.all_gather_with_grad = real_gather

    real_reduce = D.all_reduce_with_grad
    D.all_reduce_with_grad = _all_reduce_without_autograd
    try:
        out["all_reduce_without_autograd"] = run_cases(statistic_cases(), (False,))
    finally:
        D.all_reduce_with_grad = real_reduce

    # Peer bug 3: positives (and the excluded self) offset by rank * n although the
    # candidates were not gathered. Every loss here runs with local_loss=True while the
    # gather itself is switched off, so a loss must not offset anything; the check is
    # "each rank's loss equals one process on its own rows". No collective runs inside
    # the loss, so a rank that raises cannot leave the other waiting.
    out["offset_without_gather"] = {}
    for name in ("nt_xent/tile=0", "supcon/tile=0", "clip/tile=0", "siglip/tile=0"):
        inputs, scalars, fn = contrastive[name]
        out["offset_without_gather"][name] = {
            "correct": _offset_check(inputs, scalars, fn, naive=False),
            "naive": _offset_check(inputs, scalars, fn, naive=True)}
    return out


def _offset_check(inputs, scalars, fn, naive: bool) -> dict:
    """This rank's rows with gathering off: the loss must be one process's on those rows.
    ``naive``: a peer implementation that, with the gather off, still takes the
    local-loss branch and offsets positives by ``rank * n`` (the gathers here are the
    identity, so no collective runs and a rank that raises leaves no one waiting)."""
    model = Towers(len(inputs), scalars)
    outs, sc = model(*[local(x) for x in inputs])
    with torch.no_grad():
        ref = float(fn(outs, sc, False, False))        # one process, this rank's rows
    real = (D.all_gather_with_grad, D.all_gather_no_grad, D.gathered_offset)
    try:
        if naive:
            D.all_gather_with_grad = D.all_gather_no_grad = _no_gather
            D.gathered_offset = lambda n, gathered: dist.get_rank() * n
        try:
            with torch.no_grad():
                # the library with gather off (local_loss asked for, but nothing gathered)
                value = float(fn(outs, sc, naive, True))
        except (ValueError, IndexError, RuntimeError) as err:
            return {"diff": None, "error": f"{type(err).__name__}: {err}"[:200]}
    finally:
        D.all_gather_with_grad, D.all_gather_no_grad, D.gathered_offset = real
    return {"diff": abs(value - ref), "error": None}


# ----------------------------------------------------------------------------- the worker


def _worker(rank: int, init_file: str, out_dir: str, ddp: bool = False) -> None:
    global USE_DDP
    USE_DDP = ddp
    torch.set_num_threads(1)
    # a timeout turns a rank stuck in a collective into an error instead of a hang
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    result: dict = {"seconds": {}}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result["seconds"][name] = round(now - clock, 3)
        clock = now

    try:
        lap("init")
        result["world"] = {"is_distributed": D.is_distributed(), "world_size": D.world_size(),
                           "rank": D.rank(), "rank_offset": D.rank_offset(N),
                           "check_gather": list(check_gather(True, True))}
        try:
            D.all_gather_with_grad(torch.zeros(N + rank, 3))
            result["unequal_shapes"] = None
        except ValueError as err:
            result["unequal_shapes"] = str(err)
        lap("world")
        if ddp:     # the real thing, on a few cases
            cases = contrastive_cases()
            result["cases"] = run_cases({k: cases[k] for k in ("nt_xent/tile=3", "clip/tile=0")})
            result["cases"].update(run_cases(statistic_cases(), (False,)))
            result["moco_queue"] = moco_queue_case()
            return
        result["cases"] = run_cases(contrastive_cases())
        lap("contrastive")
        result["cases"].update(run_cases(statistic_cases(), (False,)))
        lap("statistics")
        result["moco_queue"] = moco_queue_case()
        result["moco_queue_not_gathered"] = moco_queue_case(patch_enqueue_gather=False)
        result["dino_center"] = dino_center_case()
        lap("moco, dino")
        result["methods"] = methods_case()
        lap("methods")
        result["bugs"] = bug_cases()
        lap("bugs")
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def spawn(tmp: Path, ddp: bool = False) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp), ddp), nprocs=WORLD, join=True)
    out = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return spawn(tmp_path_factory.mktemp("dist"))


# ----------------------------------------------------------------------------- the tests


def test_world_of_two_reports_itself(results):
    for r, res in enumerate(results):
        assert res["world"] == {"is_distributed": True, "world_size": WORLD, "rank": r,
                                "rank_offset": r * N, "check_gather": [True, True]}
        assert "every rank must pass a tensor of the same shape" in res["unequal_shapes"]
        assert "[(4, 3), (5, 3)]" in res["unequal_shapes"]


def test_two_processes_equal_one_process_on_the_concatenated_batch(results):
    names = set(results[0]["cases"])
    expected = {f"{loss}/tile={t}/local_loss={ll}" for loss in
                ("nt_xent", "clip", "supcon", "siglip", "moco_v3_keys")
                for t in (0, 3) for ll in (False, True)}
    expected |= {"barlow_twins/local_loss=False", "vicreg/local_loss=False"}
    assert names == expected
    for r, res in enumerate(results):
        for name, m in res["cases"].items():
            assert m["loss"] <= TOL, f"rank {r} {name}: loss differs by {m['loss']:.3g}"
            assert m["grad"] <= TOL, f"rank {r} {name}: gradients differ by {m['grad']:.3g}"
            assert m["grad_scale"] > 1e-3, f"{name}: gradients too small to tell anything"


@pytest.mark.skipif(os.environ.get("NEARFAR_TEST_DDP") != "1",
                    reason="real DDP imports torch._dynamo (slow); NEARFAR_TEST_DDP=1 runs it")
def test_real_ddp_gives_the_same_gradients(tmp_path):
    for r, res in enumerate(spawn(tmp_path, ddp=True)):
        assert len(res["cases"]) == 6
        for name, m in res["cases"].items():
            assert m["loss"] <= TOL and m["grad"] <= TOL, (r, name, m)
        assert res["moco_queue"]["same_queue"]
        assert res["moco_queue"]["loss"] <= TOL and res["moco_queue"]["grad"] <= TOL


def test_moco_queue_is_one_queue_and_the_loss_is_exact(results):
    for res in results:
        m = res["moco_queue"]
        assert m["same_queue"]
        assert m["loss"] <= TOL and m["grad"] <= TOL
        # without gathering the keys each rank's queue holds only its own keys
        assert not res["moco_queue_not_gathered"]["same_queue"]


def test_methods_gather_by_themselves(results):
    for res in results:
        assert res["methods"] == {
            "simclr": {"loss": True}, "barlow_twins": {"loss": True},
            "supcon_mixed": {"loss": True},
            # per-query / per-image losses differ by rank; what they share must not
            "moco_v2": {"loss": False, "queue": True}, "dino": {"loss": False, "center": True}}


def test_dino_center_is_the_global_mean(results):
    for res in results:
        assert res["dino_center"]["center"] <= 1e-12


def test_an_unsummed_gather_backward_is_caught(results):
    for name, m in results[0]["bugs"]["unsummed_gather"].items():
        worst = max(r["bugs"]["unsummed_gather"][name]["grad"] for r in results)
        assert worst > BUG_MIN, f"{name}: the unsummed gather went unnoticed ({worst:.3g})"
        assert m["loss"] <= TOL      # the forward is right; only gradients are wrong


def test_an_all_reduce_without_autograd_is_caught(results):
    for name, m in results[0]["bugs"]["all_reduce_without_autograd"].items():
        assert m["grad"] > BUG_MIN, f"{name}: went unnoticed ({m['grad']:.3g})"
        assert m["loss"] <= TOL


def test_offsetting_positives_when_nothing_was_gathered_is_caught(results):
    for name in results[0]["bugs"]["offset_without_gather"]:
        for r, res in enumerate(results):
            m = res["bugs"]["offset_without_gather"][name]
            # the library never offsets what it did not gather: exact on every rank
            assert m["correct"]["error"] is None and m["correct"]["diff"] <= TOL, (r, name, m)
        # rank 0's offset is 0, so the bug shows on rank 1: an error or a wrong value
        naive = results[1]["bugs"]["offset_without_gather"][name]["naive"]
        assert naive["error"] is not None or naive["diff"] > BUG_MIN, (name, naive)


# ----------------------------------------------------------------------------- one process


def test_world_of_one_is_a_passthrough():
    assert not dist.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    assert D.all_gather_no_grad(x) is x
    assert D.all_reduce_with_grad(x) is x and D.all_reduce_with_grad(x, "mean") is x
    assert D.all_reduce_no_grad(x) is x
    assert (D.is_distributed(), D.world_size(), D.rank(), D.rank_offset(5)) == (False, 1, 0, 0)
    assert D.gathered_offset(5, True) == 0
    assert D.resolve_gather(None) is False and D.resolve_gather(True) is False
    assert check_gather(True, True) == (False, False)
    with pytest.raises(ValueError, match="op must be 'sum' or 'mean'"):
        D.all_reduce_with_grad(x, op="max")
    with pytest.raises(ValueError, match="gather: expected None"):
        D.resolve_gather("yes")
    with pytest.raises(ValueError, match="local_loss: expected True or False"):
        check_gather(True, 1)


@pytest.mark.parametrize("local_loss", [False, True])
def test_losses_with_gather_equal_one_process_without_a_group(local_loss):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    s = torch.tensor(1.5, dtype=torch.float64)
    kw = {"gather": True, "local_loss": local_loss}
    pairs = [
        (nt_xent(a, b, **kw), nt_xent(a, b)),
        (clip_loss(a, b, s, **kw), clip_loss(a, b, s)),
        (supcon(a, labels, **kw), supcon(a, labels)),
        (siglip_loss(a, b, s, -s, **kw), siglip_loss(a, b, s, -s)),
        (barlow_twins(a, b, gather=True), barlow_twins(a, b)),
        (vicreg(a, b, gather=True), vicreg(a, b)),
    ]
    for got, want in pairs:
        assert torch.equal(got, want)
    center = torch.zeros(4, dtype=torch.float64)
    logits = a.view(2, 3, 4)
    assert torch.equal(update_center(center, logits, gather=True), update_center(center, logits))
    q1, q2 = Queue(8, 4, init="empty"), Queue(8, 4, init="empty")
    q1.enqueue(a, labels, gather=True)
    q2.enqueue(a, labels)
    assert torch.equal(q1.keys, q2.keys) and torch.equal(q1.key_labels, q2.key_labels)


def test_methods_take_the_gather_options():
    from nearfar.methods import build_method

    for name in ("moco_v2", "barlow_twins", "vicreg", "dino"):
        m = build_method(name, encoder="small_cnn", encoder_kwargs={"widths": (4,)},
                         gather=False)
        assert m.gather is False
    for name in ("moco_v3", "supcon", "supcon_mixed", "clip"):
        m = build_method(name, encoder="small_cnn", encoder_kwargs={"widths": (4,)},
                         local_loss=True)
        assert m.gather is None and m.local_loss is True
        assert m.describe()["negatives"]["processes"]["local_loss"] is True
    with pytest.raises(ValueError, match="gather: expected None"):
        build_method("vicreg", encoder="small_cnn", encoder_kwargs={"widths": (4,)}, gather=1)
