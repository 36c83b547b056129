"""The Trainer under torchrun-style multi-process training (gloo on the CPU).

One spawn of two processes runs every multi-process scenario (starting processes is
the slow part); the tests below read what each process recorded. The references
(one process on the concatenated batch, the same run uninterrupted) are computed
independently, and the CLI test starts the real ``torchrun``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nearfar.data import ImageDataset
from nearfar.distributed import all_gather_with_grad, rank_offset
from nearfar.methods import Method, StepOutput, build_method
from nearfar.train import CheckpointError, TrainConfig, Trainer, TrainingDiverged, seed_everything
from nearfar.train.launch import LaunchError, launch_env, shutdown_distributed

WORLD = 2
BATCH = 8           # per process


def tiny_data(n: int = 64) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n) % 4)


def quiet(**kw) -> TrainConfig:
    kw.setdefault("progress", False)
    kw.setdefault("tensorboard", False)
    kw.setdefault("log_every", 1)
    kw.setdefault("warmup_steps", 1)
    kw.setdefault("device", "cpu")
    return TrainConfig(**kw)


def tiny_simclr():
    """SimCLR with BatchNorm in encoder and head and random views (per-process streams)."""
    seed_everything(0)
    return build_method("simclr", encoder="small_cnn",
                        encoder_kwargs={"widths": (4, 8), "in_channels": 1},
                        temperature=0.2, hidden_dim=16, out_dim=8)


class FlatEncoder(nn.Module):
    """Linear-ReLU-Linear on flattened pixels: no BatchNorm, so a batch split over
    processes computes exactly what the whole batch does."""

    def __init__(self, in_dim: int = 64, out_dim: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, 32), nn.ReLU(),
                                 nn.Linear(32, out_dim))
        self.out_dim = out_dim

    def forward(self, x):
        return self.net(x)


class GatheredNTXent(Method):
    """NT-Xent (Chen et al., 2020) on deterministic views (the image and its mirror),
    with every process's embeddings as candidates (``all_gather_with_grad``) and this
    process's anchors: the mean over processes is the one-process loss on the whole
    global batch. ``nan_on=(rank, call)`` poisons one process's loss once."""

    name = "gathered_nt_xent"
    views_per_item = 2

    def __init__(self, nan_on: tuple[int, int] | None = None) -> None:
        super().__init__()
        seed_everything(0)
        self.encoder = FlatEncoder()
        self.nan_on = nan_on
        self.calls = 0

    def embed(self, x):
        return self.encoder(x)

    def loss(self, batch, generator=None):
        x = batch["images"]
        n = len(x)
        z = F.normalize(self.encoder(torch.cat([x, x.flip(-1)])), dim=1)
        z1, z2 = z[:n], z[n:]
        c1, c2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
        cand = torch.cat([c1, c2])
        total = len(c1)
        own = torch.arange(n) + rank_offset(n)
        anchors = torch.cat([z1, z2])
        self_idx = torch.cat([own, own + total])
        pos_idx = torch.cat([own + total, own])
        logits = anchors @ cand.T / 0.5
        logits[torch.arange(2 * n), self_idx] = float("-inf")
        loss = F.cross_entropy(logits, pos_idx)
        self.calls += 1
        if self.nan_on is not None and self.nan_on == (dist.get_rank() if dist.is_initialized()
                                                       else 0, self.calls):
            loss = loss * float("nan")
        return StepOutput(loss=loss, embeddings=z1.detach())

    def describe(self):
        return {"method": self.name}


def mirror_views(x, generator=None):
    """Deterministic views: the image and its mirror (no per-process random stream)."""
    return x, x.flip(-1)


def flat_simclr():
    """The library's SimCLR with an encoder and head without BatchNorm and deterministic
    views; under several processes it gathers its negatives (gather=None: automatic)."""
    seed_everything(0)
    return build_method("simclr", encoder=FlatEncoder(), views=mirror_views, temperature=0.5,
                        num_layers=1, out_dim=8)


def reference_nt_xent(x, encoder):
    """NT-Xent on one process, straight from the definition, in float64."""
    z = F.normalize(encoder(torch.cat([x, x.flip(-1)])).double(), dim=1)
    n = len(x)
    sim = z @ z.T / 0.5
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = torch.cat([sim[i, :i], sim[i, i + 1:]])
        total = total - (sim[i, j] - torch.logsumexp(others, 0))
    return total / (2 * n)


def params_and_grads(method):
    return ({k: v.detach().clone() for k, v in method.state_dict().items()},
            {k: p.grad.detach().clone() for k, p in method.named_parameters()
             if p.grad is not None})


# ------------------------------------------------------------------ the two processes

def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    out: dict[str, object] = {}
    data = tiny_data()

    # 1. four steps, checkpoint every two; process 1 is handed a run directory of its own
    # that it must never create (only process 0 writes)
    run_a = tmp_path / ("a" if rank == 0 else "a-rank1-must-not-exist")
    method = tiny_simclr()
    Trainer(method, data, quiet(steps=4, batch_size=BATCH, checkpoint_every=2),
            run_dir=run_a).fit()      # joins the process group itself (env:// from above)
    out["a"] = params_and_grads(method)[0]

    # 2. the same run, stopped after two steps, then resumed by new Trainers
    run_b = tmp_path / "b"
    method = tiny_simclr()
    Trainer(method, data, quiet(steps=4, batch_size=BATCH), run_dir=run_b).fit(stop_at_step=2)
    method = tiny_simclr()
    Trainer(method, data, quiet(steps=4, batch_size=BATCH), run_dir=run_b).fit(resume=True)
    out["b"] = params_and_grads(method)[0]

    # 3. gathered NT-Xent, no BatchNorm, deterministic views: three steps and the last
    # step's (all-reduced) gradients, to compare with one process on the whole batch
    method = GatheredNTXent()
    Trainer(method, data, quiet(steps=3, batch_size=BATCH, optimizer="lars", lr=0.1,
                                collapse_std=0)).fit()
    out["gathered"] = params_and_grads(method)
    method = flat_simclr()
    Trainer(method, data, quiet(steps=3, batch_size=BATCH, optimizer="lars", lr=0.1,
                                collapse_std=0)).fit()
    out["simclr"] = params_and_grads(method)

    # 4. a NaN on process 1 only, at step 2: every process stops there, unchanged
    method = GatheredNTXent(nan_on=(1, 2))
    try:
        Trainer(method, data, quiet(steps=4, batch_size=BATCH, collapse_std=0)).fit()
        out["nan"] = None
    except TrainingDiverged as exc:
        out["nan"] = exc.step

    # 5. process 1's clock says the time budget is spent, process 0's does not: both
    # leave the loop at the same step (else process 0 would wait for it forever)
    trainer = Trainer(GatheredNTXent(), data, quiet(steps=4, batch_size=BATCH, collapse_std=0,
                                                    time_budget_s=1e9))
    if rank == 1:
        trainer.config.time_budget_s = 1e-9
    result = trainer.fit()
    out["budget"] = (result.stopped, result.step)

    # 6. SyncBatchNorm needs GPUs: a clear error on every process, before any step
    try:
        Trainer(tiny_simclr(), data, quiet(steps=1, batch_size=BATCH, sync_batchnorm=True))
        out["sync_bn"] = None
    except ValueError as exc:
        out["sync_bn"] = str(exc)

    torch.save(out, tmp_path / f"out-{rank}.pt")
    shutdown_distributed()      # every process done (a barrier), then leave


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert key not in os.environ, "run the test suite itself without torchrun"
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):      # raises if a process failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the processes did not finish in 180 s: a collective reached by "
                        "only some of them?")
    outs = [torch.load(tmp / f"out-{r}.pt", weights_only=False) for r in range(WORLD)]
    return tmp, outs


def test_every_process_ends_with_the_same_weights(two_processes):
    _, (r0, r1) = two_processes
    for scenario in ("a", "b"):
        assert r0[scenario].keys() == r1[scenario].keys()
        for k in r0[scenario]:
            assert torch.equal(r0[scenario][k], r1[scenario][k]), (scenario, k)
    # and training moved them: process 0's weights differ from the initial ones
    init = tiny_simclr().state_dict()
    moved = [k for k in init if init[k].is_floating_point()
             and not torch.equal(init[k], r0["a"][k])]
    assert len(moved) > 5


def test_only_process_zero_writes_records(two_processes):
    tmp, (r0, _) = two_processes
    assert not (tmp / "a-rank1-must-not-exist").exists()
    run = tmp / "a"
    names = sorted(p.name for p in run.iterdir())
    assert names == ["checkpoint.json", "metrics.jsonl", "run.json", "step-000002",
                     "step-000004", "weights.safetensors"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]        # one writer, one line a step
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == WORLD and info["global_batch_size"] == WORLD * BATCH
    from nearfar.train import load_weights
    saved = load_weights(run)
    assert all(torch.equal(saved[k], r0["a"][k].cpu()) for k in saved)
    state = torch.load(run / "step-000004" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == WORLD and len(state["rank_rng"]) == WORLD
    # each process's own views stream was saved (they differ), not process 0's twice
    assert not torch.equal(state["rank_rng"][0]["views"], state["rank_rng"][1]["views"])


def test_resume_across_processes_is_exact(two_processes):
    _, (r0, r1) = two_processes
    for r in (r0, r1):
        for k in r["a"]:
            assert torch.equal(r["a"][k], r["b"][k]), k


@pytest.mark.parametrize("scenario", ["gathered", "simclr"])
def test_two_processes_match_one_process_on_the_whole_batch(two_processes, scenario):
    _, (r0, r1) = two_processes
    # one process, batch 2b: the same global order (same seed), the same three steps
    method = GatheredNTXent() if scenario == "gathered" else flat_simclr()
    Trainer(method, tiny_data(), quiet(steps=3, batch_size=WORLD * BATCH, optimizer="lars",
                                       lr=0.1, collapse_std=0)).fit()
    weights, grads = params_and_grads(method)
    if scenario == "gathered":
        # the test's gathered loss is NT-Xent over the whole batch (independent formula)
        x = tiny_data().images[:WORLD * BATCH].float() / 255
        assert torch.allclose(GatheredNTXent().loss({"images": x}).loss.double(),
                              reference_nt_xent(x, GatheredNTXent().encoder), atol=1e-5)
    for r in (r0, r1):
        w2, g2 = r[scenario]
        assert grads.keys() == g2.keys() and len(grads) >= 4
        for k in grads:
            scale = grads[k].abs().max()
            assert scale > 0
            assert (grads[k] - g2[k]).abs().max() <= 1e-5 * max(1.0, float(scale)), k
        for k in weights:
            assert (weights[k] - w2[k]).abs().max() <= 1e-5, k


def test_a_nan_on_one_process_stops_every_process(two_processes):
    _, (r0, r1) = two_processes
    assert r0["nan"] == 2 and r1["nan"] == 2


def test_the_time_budget_stops_every_process_at_the_same_step(two_processes):
    _, (r0, r1) = two_processes
    assert r0["budget"] == r1["budget"] == ("time_budget", 0)


def test_resuming_with_another_world_size_is_refused_unless_asked(two_processes):
    tmp, _ = two_processes
    run = tmp / "b"
    method = tiny_simclr()
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\), but this run has "
                                              r"1.*allow_world_size_change=true"):
        Trainer(method, tiny_data(), quiet(steps=4, batch_size=BATCH),
                run_dir=run).fit(resume="step-000002")
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000004"]
    # opting in continues the run with one process from process 0's random states
    method = tiny_simclr()
    result = Trainer(method, tiny_data(), quiet(steps=4, batch_size=BATCH,
                                                allow_world_size_change=True),
                     run_dir=run).fit(resume="step-000002")
    assert result.step == 4 and result.steps_run == 2 and result.world_size == 1


# ------------------------------------------------------------------ launcher environment

def test_launch_env_errors_name_the_variable():
    assert launch_env({}) is None
    env = launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                      "MASTER_ADDR": "h", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (1, 2, 1, 29500)
    with pytest.raises(LaunchError, match="WORLD_SIZE not set while RANK is"):
        launch_env({"RANK": "0"})
    with pytest.raises(LaunchError, match=r"RANK: expected 0 \.\. 1 for WORLD_SIZE=2, got 2"):
        launch_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(LaunchError, match="WORLD_SIZE: expected an integer >= 1, got 'two'"):
        launch_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(LaunchError, match="MASTER_PORT: not set"):
        launch_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})


def test_sync_batchnorm_on_the_cpu_is_a_clear_error(two_processes):
    _, (r0, r1) = two_processes
    for r in (r0, r1):
        assert r["sync_bn"].startswith("TrainConfig.sync_batchnorm: PyTorch's SyncBatchNorm "
                                       "runs on GPUs only")
    # one process has nothing to synchronise: the setting is accepted and changes nothing
    Trainer(tiny_simclr(), tiny_data(), quiet(steps=1, batch_size=BATCH, sync_batchnorm=True))
    with pytest.raises(ValueError, match="TrainConfig.sync_batchnorm: expected true or false"):
        TrainConfig(sync_batchnorm="yes")


# ------------------------------------------------------------------ the real CLI

def test_torchrun_cli_trains_and_writes_one_run_dir(tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "-m", "nearfar", "train", "--no-progress",
           "--run-dir", str(run), "--device", "cpu",
           "--set", 'data.source="digits"', "--set", "data.test_size=200",
           "--set", "trainer.steps=2",
           "--set", 'trainer.precision="fp32"', "--set", "trainer.channels_last=false",
           "--set", "trainer.batch_size=16", "--set", "trainer.threads=1",
           "--set", "trainer.log_every=1",
           "--set", "trainer.tensorboard=false", "--set", "eval.linear_probe=false",
           "--set", "encoder.widths=[4, 8]", "--set", "method.hidden_dim=16",
           "--set", "method.out_dim=8"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 2 steps") == 1          # process 0 reports, once
    assert f"{WORLD} processes" in done.stdout
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == WORLD and info["global_batch_size"] == WORLD * 16
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["fit"]["world_size"] == WORLD and evaluation["results"]
    assert (run / "card.json").exists() and (run / "weights.safetensors").exists()
