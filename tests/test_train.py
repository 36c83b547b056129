"""The Trainer: learning, exact resume, checkpoint integrity, guards, LARS, schedule."""

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nearfar.data import ImageDataset, load_mnist5k
from nearfar.evaluate import embed_dataset, knn_accuracy
from nearfar.methods import Method, StepOutput, build_method
from nearfar.train import (
    LARS,
    CheckpointError,
    EmbeddingCollapse,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    WarmupCosine,
    load_weights,
    seed_everything,
    split_decay_groups,
    warmup_cosine_factor,
)


@pytest.fixture(scope="module")
def digits14():
    """MNIST-5k at 14x14 (2x2 average pool): 512 train and 300 held-out, shuffled."""
    ds = load_mnist5k()
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    small = F.avg_pool2d(ds.images.float(), 2).round().to(torch.uint8)
    tr, te = idx[:512], idx[512:812]
    return ImageDataset(small[tr], ds.labels[tr]), ImageDataset(small[te], ds.labels[te])


def tiny_simclr(widths=(4, 8), hidden_dim=16, out_dim=8, strides=None):
    seed_everything(0)
    return build_method("simclr", encoder="small_cnn",
                        encoder_kwargs={"widths": widths, "strides": strides},
                        temperature=0.2, hidden_dim=hidden_dim, out_dim=out_dim)


def quiet(**kw):
    kw.setdefault("progress", False)
    kw.setdefault("log_every", 1)
    return TrainConfig(**kw)


def tree_digest(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def logged(run_dir, key="loss"):
    return [json.loads(x)[key] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ learning


def test_short_simclr_run_beats_random_init_on_knn(digits14):
    train, test = digits14
    method = tiny_simclr(widths=(8, 16, 32), hidden_dim=64, out_dim=32, strides=(1, 2, 2))

    def knn():
        a = embed_dataset(method, train.images)
        b = embed_dataset(method, test.images)
        return float(knn_accuracy(a, train.labels, b, test.labels, k=10))

    before = knn()
    result = Trainer(method, train, quiet(steps=80, batch_size=64, lr=1e-2, warmup_steps=2,
                                          log_every=10)).fit()
    after = knn()
    assert result.steps_run == 80 and result.stopped == "completed"
    assert result.images_per_s > 0 and result.views_per_s == 2 * result.images_per_s
    print(f"kNN before {before:.3f} after {after:.3f}")
    assert after > before + 0.03, (before, after)


# -------------------------------------------------------------------------- resume


@pytest.mark.parametrize("settings", [
    {},
    {"optimizer": "lars", "lr": 0.5, "accumulate": 2, "grad_clip": 1.0, "precision": "bf16",
     "channels_last": True},
], ids=["adamw-fp32", "lars-bf16-accumulate"])
def test_resume_is_bitwise_identical(tmp_path, digits14, settings):
    train, _ = digits14
    # 7 steps of 2 x 64 items cross an epoch boundary (512 items) for accumulate=2
    cfg = dict(steps=7, batch_size=64, warmup_steps=2, checkpoint_every=3, **settings)
    full = tmp_path / "full"
    Trainer(tiny_simclr(), train, quiet(**cfg), run_dir=full).fit()

    part = tmp_path / "part"
    first = Trainer(tiny_simclr(), train, quiet(**cfg), run_dir=part).fit(stop_at_step=4)
    assert first.stopped == "stop_at_step" and first.step == 4
    # a fresh process: new method with different initial weights, new trainer
    torch.manual_seed(123)
    other_init = tiny_simclr()
    with torch.no_grad():
        for p in other_init.parameters():
            p.add_(1.0)
    rest = Trainer(other_init, train, quiet(**cfg), run_dir=part).fit(resume=True)
    assert rest.step == 7 and rest.steps_run == 3

    assert logged(part) == logged(full)            # exact float equality, all 7 steps
    assert logged(part, "lr") == logged(full, "lr")
    assert load_weights(part).keys() == load_weights(full).keys()
    for k, v in load_weights(full).items():
        assert torch.equal(load_weights(part)[k], v), k


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, digits14):
    train, _ = digits14
    cfg = quiet(steps=6, batch_size=64, checkpoint_every=2)
    run = tmp_path / "run"
    trainer = Trainer(tiny_simclr(), train, cfg, run_dir=run)
    trainer.fit(stop_at_step=2)
    # simulate a crash after step 3 was logged but before its checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n{\"step\": 4, \"lo")
    Trainer(tiny_simclr(), train, cfg, run_dir=run).fit(resume=True)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4, 5, 6]
    assert 0.0 not in logged(run)


# --------------------------------------------------------------- checkpoint safety


def test_run_dir_layout_and_index(tmp_path, digits14):
    train, _ = digits14
    run = tmp_path / "run"
    result = Trainer(tiny_simclr(), train, quiet(steps=5, batch_size=64, checkpoint_every=2,
                                                 keep_checkpoints=2), run_dir=run).fit()
    assert result.run_dir == str(run) and result.final_loss == logged(run)[-1]
    names = sorted(p.name for p in run.iterdir())
    assert names == ["checkpoint.json", "metrics.jsonl", "run.json", "step-000004",
                     "step-000005", "weights.safetensors"]
    index = json.loads((run / "checkpoint.json").read_text())
    assert index["latest"] == "step-000005" and index["step"] == 5
    entry = index["checkpoints"][-1]
    for name, rec in entry["files"].items():
        data = (run / "step-000005" / name).read_bytes()
        assert rec["bytes"] == len(data)
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()
    info = json.loads((run / "run.json").read_text())
    assert info["method"]["negatives"]["batch_size"] == 64
    assert info["config"]["steps"] == 5 and info["data"]["n_items"] == 512
    # trainer_state.pt loads with weights_only
    state = torch.load(run / "step-000005" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 5 and isinstance(state["rng"]["data"], torch.Tensor)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_is_a_clear_error_and_left_untouched(tmp_path, digits14, damage):
    train, _ = digits14
    run = tmp_path / "run"
    cfg = quiet(steps=6, batch_size=64, checkpoint_every=2, keep_checkpoints=3)
    Trainer(tiny_simclr(), train, cfg, run_dir=run).fit(stop_at_step=4)
    target = run / "step-000004" / "weights.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        target.unlink()
    before = tree_digest(run)
    with pytest.raises(CheckpointError) as err:
        Trainer(tiny_simclr(), train, cfg, run_dir=run).fit(resume=True)
    msg = str(err.value)
    assert str(target) in msg
    expected = {"truncate": f"{len(data) // 2} of {len(data)} bytes expected from "
                            f"checkpoint.json",
                "flip": "is corrupt (sha256 ", "delete": "is missing"}[damage]
    assert expected in msg
    if damage == "truncate":
        assert "is truncated (" in msg
    assert "step-000002" in msg and "resume='step-000002'" in msg
    assert tree_digest(run) == before   # the failed run wrote nothing

    # the suggested way out works and continues from step 2
    result = Trainer(tiny_simclr(), train, cfg, run_dir=run).fit(resume="step-000002")
    assert result.step == 6 and result.steps_run == 4


def test_fresh_start_refuses_a_run_dir_with_checkpoints(tmp_path, digits14):
    train, _ = digits14
    run = tmp_path / "run"
    cfg = quiet(steps=2, batch_size=64)
    Trainer(tiny_simclr(), train, cfg, run_dir=run).fit()
    before = tree_digest(run)
    with pytest.raises(CheckpointError, match="already holds checkpoints.*resume=True"):
        Trainer(tiny_simclr(), train, cfg, run_dir=run).fit()
    assert tree_digest(run) == before


def test_resume_with_other_settings_is_refused(tmp_path, digits14):
    train, _ = digits14
    run = tmp_path / "run"
    Trainer(tiny_simclr(), train, quiet(steps=4, batch_size=64), run_dir=run).fit(
        stop_at_step=2)
    with pytest.raises(CheckpointError, match="TrainConfig.batch_size: this run has 32"):
        Trainer(tiny_simclr(), train, quiet(steps=4, batch_size=32), run_dir=run).fit(
            resume=True)


# -------------------------------------------------------------------------- guards


class Toy(Method):
    """A linear map trained to a target; the loss turns NaN at ``nan_at`` (1-based)."""

    name = "toy"

    def __init__(self, nan_at=None, collapse=False):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.calls = 0
        self.nan_at = nan_at
        self.collapse = collapse

    def embed(self, x):
        return self.lin(x.flatten(1)[:, :4])

    def loss(self, batch, generator=None):
        self.calls += 1
        z = self.embed(batch["images"])
        loss = (z - 1).pow(2).mean()
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        emb = torch.ones_like(z) if self.collapse else torch.randn(z.shape, generator=generator)
        return StepOutput(loss, {}, emb.detach())

    def describe(self):
        return {"objective": {}, "positives": {}, "negatives": {}, "modality": "image"}


def toy_data(n=32):
    return torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))


def test_nan_loss_stops_before_the_update(tmp_path):
    method = Toy(nan_at=3)
    trainer = Trainer(method, toy_data(), quiet(steps=10, batch_size=8, checkpoint_every=1),
                      run_dir=tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: the loss is nan") as err:
        trainer.fit()
    assert err.value.step == 3 and math.isnan(err.value.loss)
    assert "step-000002" in str(err.value)
    assert all(torch.isfinite(p).all() for p in method.parameters())
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"] == 2


def test_collapsed_embeddings_stop_training():
    method = Toy(collapse=True)
    trainer = Trainer(method, toy_data(), quiet(steps=50, batch_size=8, collapse_std=0.05,
                                                collapse_patience=4))
    with pytest.raises(EmbeddingCollapse, match="collapsed at step 4.*below 0.05 for 4") as err:
        trainer.fit()
    assert err.value.step == 4 and err.value.spread == pytest.approx(0.0, abs=1e-6)
    # healthy embeddings never trigger it
    Trainer(Toy(), toy_data(), quiet(steps=10, batch_size=8, collapse_patience=1)).fit()


def test_time_budget_stops_early():
    result = Trainer(Toy(), toy_data(), quiet(steps=10_000, batch_size=8,
                                              time_budget_s=0.05)).fit()
    assert result.stopped == "time_budget" and 0 < result.step < 10_000


def test_epochs_set_the_run_length():
    trainer = Trainer(Toy(), toy_data(32), quiet(epochs=2.5, batch_size=8, accumulate=2))
    assert trainer.total_steps == 5   # 4 micro-batches per epoch, 2 per step
    assert trainer.fit().step == 5


# ------------------------------------------------------------- optimizer, schedule


def test_warmup_then_cosine_values():
    f = [warmup_cosine_factor(s, total_steps=12, warmup_steps=4, min_lr_ratio=0.1)
         for s in range(13)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0
    for s in range(4, 13):
        expect = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 8))
        assert f[s] == pytest.approx(expect)
    assert f[8] == pytest.approx(0.55) and f[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_warmup_cosine_scheduler_state_roundtrip():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.0)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(5):
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen[:3] == [1.0, 2.0, 2.0]
    opt2 = torch.optim.SGD([p], lr=2.0)
    sched2 = WarmupCosine(opt2, total_steps=10, warmup_steps=2)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == seen[-1]
    sched.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_lars_step_matches_the_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(3))
    gw, gb = torch.randn(3, 4), torch.randn(3)
    opt = LARS([{"params": [w], "lars_adapt": True, "weight_decay": 0.1},
                {"params": [b], "lars_adapt": False, "weight_decay": 0.0}],
               lr=0.5, momentum=0.9, trust_coefficient=0.01)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + 0.1 * w0
    trust = 0.01 * w0.norm() / (d.norm() + 1e-8)
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)       # no adaptation, no decay
    # second step: momentum buffer v = 0.9 v + d
    w1 = w.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d2 = gw + 0.1 * w1
    v = 0.9 * (trust * d) + 0.01 * w1.norm() / (d2.norm() + 1e-8) * d2
    torch.testing.assert_close(w.detach(), w1 - 0.5 * v)


def test_split_decay_groups_excludes_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2, 2))
    adapt, plain = split_decay_groups(model, 0.05)
    assert adapt["weight_decay"] == 0.05 and adapt["lars_adapt"] is True
    assert plain["weight_decay"] == 0.0 and plain["lars_adapt"] is False
    assert [p.ndim for p in adapt["params"]] == [4, 2]
    assert len(plain["params"]) == 4   # conv bias, BN weight and bias, linear bias


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize("kw, msg", [
    ({"batch_size": 1}, "TrainConfig.batch_size: expected an integer >= 2, got 1"),
    ({"optimizer": "sgd"}, "TrainConfig.optimizer: expected one of adamw, lars, got 'sgd'"),
    ({"precision": "fp16"}, "TrainConfig.precision: expected one of fp32, bf16"),
    ({"lr": 0}, "TrainConfig.lr: expected a number > 0"),
    ({"steps": "5"}, "TrainConfig.steps: expected an integer >= 1"),
])
def test_config_errors_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        TrainConfig(**kw)


def test_trainer_checks_batch_against_data():
    with pytest.raises(ValueError, match="batch_size: 64 is larger than the dataset"):
        Trainer(Toy(), toy_data(32), quiet(batch_size=64))
    with pytest.raises(ValueError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        Trainer(Toy(), toy_data(32), quiet(batch_size=8, device="cuda"))


def test_threads_apply_during_fit_only():
    seen = []

    class Probe(Toy):
        def loss(self, batch, generator=None):
            seen.append(torch.get_num_threads())
            return super().loss(batch, generator)

    before = torch.get_num_threads()
    Trainer(Probe(), toy_data(), quiet(steps=2, batch_size=8, threads=2)).fit()
    assert seen == [2, 2] and torch.get_num_threads() == before
