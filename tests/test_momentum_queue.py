"""The shared momentum copy (EMA) and the key queue, alone and inside the methods."""

import json
import math

import pytest
import torch
from torch import nn

import nearfar.methods.moco as moco_module
from nearfar.losses import moco_loss
from nearfar.methods import build_method
from nearfar.methods.moco import moco_loss_excluding
from nearfar.nn.momentum import EMA, cosine_momentum
from nearfar.nn.queue import Queue
from nearfar.train import TrainConfig, Trainer, load_weights, seed_everything, split_decay_groups


def images(n=8, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


def batch(n=8, size=12, labels=True):
    return {"images": images(n, size), "index": torch.arange(n),
            "labels": torch.arange(n) % 3 if labels else None}


def tiny(name, **kw):
    seed_everything(0)
    return build_method(name, encoder="small_cnn", encoder_kwargs={"widths": (4, 8)},
                        hidden_dim=16, out_dim=8, **kw)


# ----------------------------------------------------------------------------- EMA


def test_cosine_momentum_schedule_values():
    base = 0.99
    assert cosine_momentum(0.0, base) == pytest.approx(base)
    assert cosine_momentum(1.0, base) == pytest.approx(1.0)
    assert cosine_momentum(0.5, base) == pytest.approx((1 + base) / 2)
    # 1 - (1 - base) (cos(pi p) + 1) / 2, rising monotonically, clamped outside [0, 1]
    values = [cosine_momentum(p / 10, base) for p in range(11)]
    assert values == sorted(values)
    for p in (0.1, 0.3, 0.9):
        assert cosine_momentum(p, base) == pytest.approx(
            1 - (1 - base) * (math.cos(math.pi * p) + 1) / 2)
    assert cosine_momentum(-1.0, base) == pytest.approx(base)
    assert cosine_momentum(2.0, base) == pytest.approx(1.0)
    ema = EMA(nn.Linear(2, 2), 0.9, schedule="constant")
    assert ema.momentum_at(0.0) == ema.momentum_at(0.7) == ema.momentum_at(1.0) == 0.9


def test_ema_update_is_exactly_the_formula():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    ema = EMA(online, base_momentum=0.9)
    for p in online.parameters():          # make online and target differ
        p.data.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in ema.module.named_parameters()}
    progress = 0.3
    m = ema.update(online, progress)
    assert m == pytest.approx(cosine_momentum(progress, 0.9)) and ema.momentum == m
    for name, o in online.named_parameters():
        expected = m * before[name] + (1 - m) * o.detach()
        torch.testing.assert_close(dict(ema.module.named_parameters())[name], expected,
                                   rtol=1e-6, atol=1e-7)
    # moves toward the online parameters, never past them
    for name, o in online.named_parameters():
        t = dict(ema.module.named_parameters())[name]
        assert (t - o).norm() < (before[name] - o).norm()
    # at the end of training (m = 1) the copy stays put; m = 0 copies
    frozen = {k: v.clone() for k, v in ema.module.named_parameters()}
    assert ema.update(online, 1.0) == 1.0
    for k, v in ema.module.named_parameters():
        assert torch.equal(v, frozen[k])
    ema.update(online, momentum=0.0)
    for (_, t), (_, o) in zip(ema.module.named_parameters(), online.named_parameters()):
        assert torch.equal(t, o)


def test_ema_gets_no_gradient_and_no_optimizer_slot():
    m = tiny("byol", predictor_hidden_dim=8)
    assert all(not p.requires_grad for p in m.target.parameters())
    in_groups = {id(p) for g in split_decay_groups(m, 1e-4) for p in g["params"]}
    assert not any(id(p) in in_groups for p in m.target.parameters())
    out = m.loss(batch(), torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is None for p in m.target.parameters())
    assert m.encoder.features[0][0].weight.grad is not None


def test_ema_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base_momentum: expected a number in"):
        EMA(nn.Linear(2, 2), 1.5)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        EMA(nn.Linear(2, 2), 0.9, schedule="linear")
    ema = EMA(nn.Linear(2, 2), 0.9)
    with pytest.raises(ValueError, match="same parameters"):
        ema.update(nn.Linear(2, 2, bias=False), 0.5)
    with pytest.raises(ValueError, match="expected progress"):
        ema.update(nn.Linear(2, 2))


@pytest.mark.parametrize("name,attr", [("byol", "target"), ("moco_v3", "momentum_encoder"),
                                       ("moco_v2", "key_encoder"), ("dino", "teacher")])
def test_after_step_moves_each_methods_copy_by_the_schedule(name, attr):
    kw = {"dino": {"num_prototypes": 16, "local_crops": 1}}.get(name, {})
    if name == "dino":
        seed_everything(0)
        m = build_method("dino", encoder="small_cnn", encoder_kwargs={"widths": (4, 8)},
                         hidden_dim=16, bottleneck_dim=8, base_momentum=0.9, **kw)
    else:
        m = tiny(name, base_momentum=0.9)
    ema = getattr(m, attr)
    online = m._online()
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.named_parameters()}
    m.after_step(0.25)
    mom = cosine_momentum(0.25, 0.9)
    for k, o in online.named_parameters():
        torch.testing.assert_close(dict(ema.module.named_parameters())[k],
                                   mom * before[k] + (1 - mom) * o.detach())


# --------------------------------------------------------------------------- Queue


def rows(start, n, dim=2):
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)


def test_queue_fifo_order_and_wraparound():
    q = Queue(5, 2, init="empty")
    assert len(q) == 0 and q.get().shape == (0, 2)
    q.enqueue(rows(0, 2), labels=torch.tensor([10, 11]), ids=torch.tensor([0, 1]))
    q.enqueue(rows(2, 2), labels=torch.tensor([12, 13]), ids=torch.tensor([2, 3]))
    assert len(q) == 4 and int(q.ptr) == 4
    torch.testing.assert_close(q.ordered(), rows(0, 4))
    q.enqueue(rows(4, 3), labels=torch.tensor([14, 15, 16]), ids=torch.tensor([4, 5, 6]))
    # full: the two oldest (0, 1) were overwritten, in order, wrapping around
    assert len(q) == 5 and int(q.ptr) == 2
    torch.testing.assert_close(q.ordered(), rows(2, 5))
    torch.testing.assert_close(q.get(), torch.cat([rows(5, 2), rows(2, 3)]))
    assert q.get_labels().tolist() == [15, 16, 12, 13, 14]
    assert q.get_ids().tolist() == [5, 6, 2, 3, 4]
    # a batch longer than the queue keeps only its newest K rows
    q.enqueue(rows(100, 7))
    torch.testing.assert_close(q.ordered(), rows(102, 5))
    assert q.get_labels().tolist() == [-1] * 5


def test_queue_random_init_is_full_of_unit_vectors():
    q = Queue(16, 4, seed=3)
    assert len(q) == 16
    torch.testing.assert_close(q.get().norm(dim=1), torch.ones(16))
    assert (q.get_labels() == -1).all() and (q.get_ids() == -1).all()
    torch.testing.assert_close(Queue(16, 4, seed=3).get(), q.get())


def test_queue_get_is_a_detached_copy_and_no_gradient_reaches_it():
    q = Queue(6, 3, init="empty")
    keys = torch.randn(4, 3, requires_grad=True)
    q.enqueue(keys)
    assert not q.keys.requires_grad
    neg = q.get()
    assert not neg.requires_grad
    neg.add_(100.0)                                 # the copy is not the buffer
    torch.testing.assert_close(q.ordered(), keys.detach())
    query = torch.randn(2, 3, requires_grad=True)
    key = torch.randn(2, 3)
    negatives = q.get()
    loss = moco_loss(query, key, negatives)
    q.enqueue(key)                                  # enqueued before backward: still fine
    loss.backward()
    assert query.grad is not None and q.keys.grad is None


def test_queue_state_round_trips_through_a_state_dict():
    q = Queue(5, 2, init="empty")
    q.enqueue(rows(0, 7), labels=torch.arange(7), ids=torch.arange(7))
    r = Queue(5, 2, init="empty")
    r.load_state_dict(q.state_dict())
    torch.testing.assert_close(r.ordered(), q.ordered())
    assert int(r.ptr) == int(q.ptr) and len(r) == len(q)
    r.enqueue(rows(50, 1))
    q.enqueue(rows(50, 1))
    torch.testing.assert_close(r.ordered(), q.ordered())


def test_queue_rejects_bad_shapes():
    q = Queue(4, 3)
    with pytest.raises(ValueError, match=r"keys: expected shape \(B, 3\)"):
        q.enqueue(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        q.enqueue(torch.zeros(2, 3), labels=torch.zeros(3))
    with pytest.raises(ValueError, match="size: expected an integer >= 1"):
        Queue(0, 3)


def test_moco_never_scores_a_batch_against_its_own_keys(monkeypatch):
    m = tiny("moco_v2", queue_size=64)
    m.train()
    seen = []
    real = moco_module.moco_loss

    def spy(q, k, queue, **kw):
        seen.append((k.detach().clone(), queue.clone()))
        return real(q, k, queue, **kw)

    monkeypatch.setattr(moco_module, "moco_loss", spy)
    b = batch(8)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        b["index"] = torch.arange(8) + 8 * step        # distinct items: plain moco_loss path
        m.loss(b, g)
        k, negatives = seen[-1]
        # at scoring time, none of this batch's keys are among the negatives...
        assert not (torch.cdist(k, negatives) < 1e-6).any()
        # ...and right after, they are the newest entries of the queue, in order
        torch.testing.assert_close(m.queue.ordered()[-8:], k)
    # evaluation mode scores but does not enqueue
    m.eval()
    before = m.queue.ordered()
    m.loss(b, g)
    torch.testing.assert_close(m.queue.ordered(), before)


def test_moco_leaves_out_stale_keys_of_the_same_item():
    m = tiny("moco_v2", queue_size=32, temperature=0.2)
    b = batch(8)
    g = torch.Generator().manual_seed(0)
    m.loss(b, g)                                   # enqueues keys of items 0..7
    mask = m.queue.same_item_mask(b["index"])
    assert mask.sum(1).tolist() == [1] * 8         # each item has one stale key queued
    out = m.loss(b, torch.Generator().manual_seed(1))
    assert float(out.metrics["same_item_in_queue"]) == 1.0
    # moco_loss_excluding against the formula written out
    torch.manual_seed(0)
    q, k = torch.randn(3, 4), torch.randn(3, 4)
    queue = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    exclude = torch.zeros(3, 5, dtype=torch.bool)
    torch.testing.assert_close(moco_loss_excluding(q, k, queue, exclude, temperature=0.2),
                               moco_loss(q, k, queue, temperature=0.2))
    exclude[0, 1] = exclude[2, 4] = True
    qn = torch.nn.functional.normalize(q, dim=1).double()
    kn = torch.nn.functional.normalize(k, dim=1).double()
    ref = 0.0
    for i in range(3):
        pos = qn[i] @ kn[i] / 0.2
        negs = [qn[i] @ queue[j].double() / 0.2 for j in range(5) if not exclude[i, j]]
        ref += -(pos - torch.logsumexp(torch.stack([pos, *negs]), 0))
    torch.testing.assert_close(moco_loss_excluding(q, k, queue, exclude, temperature=0.2),
                               (ref / 3).float())


@pytest.mark.parametrize("name,kw,key", [
    ("moco_v2", {"queue_size": 20}, "queue.keys"),
    ("dino", {"num_prototypes": 16, "local_crops": 1, "freeze_prototypes": 0.5}, "dino.center"),
])
def test_queue_center_and_ema_resume_exactly(tmp_path, name, kw, key):
    data = (images(24, 12) * 255).to(torch.uint8)

    def run(run_dir, **fit):
        seed_everything(0)
        m = build_method(name, encoder="small_cnn", encoder_kwargs={"widths": (4, 8)},
                         hidden_dim=16, base_momentum=0.9, **kw)
        cfg = TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=1, progress=False,
                          log_every=1, checkpoint_every=2, tensorboard=False, collapse_std=0)
        Trainer(m, data, cfg, run_dir=run_dir).fit(**fit)

    run(tmp_path / "a")
    run(tmp_path / "b", stop_at_step=2)
    run(tmp_path / "b", resume=True)
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert a.keys() == b.keys() and key in a
    assert any(k.endswith("last_momentum") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs = [[(r["loss"], r["momentum"]) for r in map(json.loads, (tmp_path / d /
             "metrics.jsonl").read_text().splitlines())] for d in ("a", "b")]
    assert len(logs[0]) == 4 and logs[0] == logs[1]
