"""One method-agnostic training loop: steps, bf16 autocast, accumulation, checkpoints, guards.

Example::

    from nearfar.data import load_mnist5k, train_test_split
    from nearfar.methods import build_method
    from nearfar.train import Trainer, TrainConfig, seed_everything

    train, test = train_test_split(load_mnist5k(), test_size=1000, seed=0)
    seed_everything(0)
    method = build_method("simclr", encoder="small_cnn", temperature=0.2)
    result = Trainer(method, train, TrainConfig(steps=1000, precision="bf16",
                     channels_last=True), run_dir="runs/simclr").fit()

``fit(resume=True)`` continues a run from its latest checkpoint exactly as if it had
never stopped (bitwise on the CPU): the data order, the views, the optimizer, the
schedule and every random state are restored.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nearfar.durable import atomic_write
from nearfar.train.checkpoint import (
    CheckpointError,
    atomic_write_json,
    export_weights,
    load_checkpoint,
    read_index,
    save_checkpoint,
    step_dir_name,
)
from nearfar.train.config import TrainConfig
from nearfar.train.guards import CollapseGuard, check_finite_loss
from nearfar.train.lars import LARS, split_decay_groups
from nearfar.train.rng import capture_global_rng, restore_global_rng, seed_everything
from nearfar.train.schedule import WarmupCosine

METRICS = "metrics.jsonl"
RUN_INFO = "run.json"
STATE_FORMAT = 1
# settings that must match for a resume to continue the same run
_RESUME_KEYS = ("batch_size", "accumulate", "optimizer", "seed", "warmup_steps", "lr")


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        step: optimizer steps completed in the run so far (across resumes).
        steps_run: steps run by this call.
        wall_time_s: this call, start to end (setup and checkpoints included).
        train_time_s: time inside the training loop of this call.
        final_loss: loss of the last step run (None if no step ran).
        images_per_s, views_per_s: items and augmented views per second of the loop.
        stopped: "completed", "time_budget" or "stop_at_step".
        run_dir: where checkpoints and metrics went (None when not recorded).
    """

    step: int
    steps_run: int
    wall_time_s: float
    train_time_s: float
    final_loss: float | None
    images_per_s: float
    views_per_s: float
    stopped: str
    run_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"TrainConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                         f"{device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device: {device!r} requested but CUDA is not available; "
                         f"use device='cpu' or 'auto'")
    return dev


def _unpack_data(data: Any) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """(inputs, labels, extras) of a dataset: ``.images`` (N, ...) (images (N, C, H, W),
    signals (N, C, L), ...), optional ``.labels`` (N,), and optional ``.extras``, a dict
    of further per-item tensors (N, ...) (e.g. caption token ids) that batches carry
    under their own keys."""
    images = getattr(data, "images", data)
    labels = getattr(data, "labels", None)
    if not isinstance(images, Tensor) or images.ndim < 2:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"data: expected an ImageDataset or an (N, C, H, W) image tensor, "
                         f"got {got}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"data: expected uint8 (0..255) or float (0..1) images, got "
                         f"{images.dtype}")
    extras = dict(getattr(data, "extras", None) or {})
    for key, value in extras.items():
        if key in ("images", "labels", "index"):
            raise ValueError(f"data.extras: {key!r} is reserved; rename it")
        if not isinstance(value, Tensor) or value.ndim < 1 or value.shape[0] != images.shape[0]:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"data.extras[{key!r}]: expected a tensor with "
                             f"{images.shape[0]} rows like the images, got {got}")
    return images, labels, extras


class Trainer:
    """Trains any :class:`~nearfar.methods.Method` on an in-memory image dataset.

    Args:
        method: the method (an ``nn.Module`` with ``loss(batch, generator)``,
            ``after_step(progress)``, ``describe()``); moved to the device.
        data: an ``ImageDataset`` (uint8 or float images, optional labels) or an
            (N, C, H, W) tensor.
        config: a :class:`TrainConfig` (defaults if None).
        run_dir: directory for checkpoints, ``metrics.jsonl`` and ``run.json``; None
            records nothing (and cannot resume).
        batch_order: optional ``order(perm, batch_size) -> perm`` applied to each epoch's
            random permutation before it is cut into batches (a pure function of perm,
            so resuming stays exact), e.g. ``nearfar.data.DistinctGroupBatches`` to keep
            duplicates out of one batch.
    """

    def __init__(self, method: Any, data: Any, config: TrainConfig | None = None, *,
                 run_dir: str | os.PathLike | None = None, batch_order: Any = None) -> None:
        self.config = cfg = config if config is not None else TrainConfig()
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"config: expected a TrainConfig, got {type(cfg).__name__}")
        for attr in ("loss", "after_step", "describe", "state_dict"):
            if not callable(getattr(method, attr, None)):
                raise ValueError(f"method: expected a nearfar Method with {attr}(), got "
                                 f"{type(method).__name__}")
        self.method = method
        self.data = data
        if batch_order is not None and not callable(batch_order):
            raise ValueError(f"batch_order: expected None or a callable (perm, batch_size) -> "
                             f"perm, got {type(batch_order).__name__}")
        self.batch_order = batch_order
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = resolve_device(cfg.device)

        images, labels, extras = _unpack_data(data)
        self.n_items = int(images.shape[0])
        if cfg.batch_size > self.n_items:
            raise ValueError(f"TrainConfig.batch_size: {cfg.batch_size} is larger than the "
                             f"dataset ({self.n_items} items); use a smaller batch_size")
        on_device = cfg.data_on_device
        self._images = images.to(self.device) if on_device else images
        self._labels = None if labels is None else (labels.to(self.device) if on_device
                                                    else labels)
        self._extras = {k: v.to(self.device) if on_device else v for k, v in extras.items()}
        self.micro_per_epoch = self.n_items // cfg.batch_size
        if cfg.epochs is not None:
            self.total_steps = max(1, round(cfg.epochs * self.micro_per_epoch / cfg.accumulate))
        else:
            self.total_steps = cfg.steps

        method.to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else \
            torch.contiguous_format
        if cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        if hasattr(method, "memory_format"):
            method.memory_format = self.memory_format
        if hasattr(method, "batch_size"):
            method.batch_size = cfg.batch_size

        groups = split_decay_groups(method, cfg.weight_decay)
        if not groups:
            raise ValueError("method: has no trainable parameters")
        if cfg.optimizer == "lars":
            self.optimizer: torch.optim.Optimizer = LARS(
                groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.lars_trust_coefficient)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas,
                                               weight_decay=cfg.weight_decay)
        self.scheduler = WarmupCosine(self.optimizer, total_steps=self.total_steps,
                                      warmup_steps=cfg.warmup_steps,
                                      min_lr_ratio=cfg.min_lr_ratio)
        self.data_generator = torch.Generator()
        self.views_generator = torch.Generator(device=self.device)
        self.guard = CollapseGuard(cfg.collapse_std, cfg.collapse_patience)
        self.views_per_item = int(getattr(method, "views_per_item", 1))

        self.step = 0
        self.epoch = 0
        self.cursor = 0
        self.perm: Tensor | None = None
        self.elapsed_s = 0.0
        self.images_seen = 0
        self.last_checkpoint: Path | None = None
        self._started = False
        self._loop_start: float | None = None
        self._paused_s = 0.0

    def _loop_time(self) -> float:
        """Training time of the current fit() loop (checkpoint writing excluded)."""
        if self._loop_start is None:
            return 0.0
        return time.perf_counter() - self._loop_start - self._paused_s

    # ----------------------------------------------------------------- data
    def _next_indices(self) -> Tensor:
        bs = self.config.batch_size
        if self.perm is None or self.cursor + bs > self.n_items:
            if self.perm is not None:
                self.epoch += 1
            self.perm = torch.randperm(self.n_items, generator=self.data_generator)
            if self.batch_order is not None:
                perm = self.batch_order(self.perm, bs)
                if not isinstance(perm, Tensor) or perm.shape != self.perm.shape:
                    raise ValueError(f"batch_order: expected a permutation of shape "
                                     f"({self.n_items},), got {getattr(perm, 'shape', perm)}")
                self.perm = perm
            self.cursor = 0
        idx = self.perm[self.cursor:self.cursor + bs]
        self.cursor += bs
        return idx

    def _batch(self, idx: Tensor) -> dict[str, Any]:
        src_idx = idx.to(self._images.device)
        images = self._images[src_idx].to(self.device, non_blocking=True)
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        labels = None
        if self._labels is not None:
            labels = self._labels[src_idx].to(self.device, non_blocking=True)
        batch = {"images": images, "labels": labels, "index": idx.to(self.device)}
        for key, value in self._extras.items():
            batch[key] = value[src_idx].to(self.device, non_blocking=True)
        return batch

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as tensors and plain data (weights_only-safe)."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "perm": self.perm,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {**capture_global_rng(), "data": self.data_generator.get_state(),
                    "views": self.views_generator.get_state()},
            "collapse_streak": self.guard.streak,
            "elapsed_s": self.elapsed_s + self._loop_time(),
            "images_seen": self.images_seen,
            "total_steps": self.total_steps,
            "n_items": self.n_items,
            "config": self.config.to_dict(),
        }

    def _check_compatible(self, state: dict[str, Any], where: Path) -> None:
        saved = state.get("config", {})
        for key in _RESUME_KEYS:
            mine = getattr(self.config, key)
            if key in saved and saved[key] != mine:
                raise CheckpointError(
                    f"TrainConfig.{key}: this run has {mine!r} but the checkpoint {where} was "
                    f"made with {saved[key]!r}; resume with the same settings, or start a "
                    f"fresh run in a new directory")
        for key, mine in (("total_steps", self.total_steps), ("n_items", self.n_items)):
            if state.get(key) != mine:
                raise CheckpointError(
                    f"{where}: made for {key}={state.get(key)} but this run has {mine}; resume "
                    f"with the same data and run length, or start a fresh run in a new "
                    f"directory")

    def load_state_dict(self, weights: dict[str, Tensor], state: dict[str, Any],
                        where: Path | str = "checkpoint") -> None:
        where = Path(where)
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{where}: trainer state format {state.get('format')!r}, "
                                  f"expected {STATE_FORMAT}")
        self._check_compatible(state, where)
        missing, unexpected = [], []
        own = self.method.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{where}: the weights do not fit this method (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); resume with the same method and encoder")
        self.method.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        restore_global_rng(rng)
        self.data_generator.set_state(rng["data"])
        self.views_generator.set_state(rng["views"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.perm = state["perm"]
        self.guard.streak = int(state["collapse_streak"])
        self.elapsed_s = float(state["elapsed_s"])
        self.images_seen = int(state["images_seen"])

    def _fresh_start(self) -> None:
        seed = self.config.seed
        seed_everything(seed)
        self.data_generator.manual_seed(seed)
        self.views_generator.manual_seed(seed + 1)
        self.step = self.epoch = self.cursor = self.images_seen = 0
        self.perm = None
        self.elapsed_s = 0.0
        self.guard.streak = 0

    def save_checkpoint(self) -> Path | None:
        if self.run_dir is None:
            return None
        self.last_checkpoint = save_checkpoint(
            self.run_dir, self.step, self.method.state_dict(), self.state_dict(),
            keep=self.config.keep_checkpoints, metadata={"step": str(self.step)})
        return self.last_checkpoint

    # -------------------------------------------------------------- records
    def _prepare_records(self, resumed: bool) -> None:
        assert self.run_dir is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS
        if resumed:
            # drop lines logged after the checkpoint by the interrupted run
            kept = []
            if metrics.exists():
                for line in metrics.read_text("utf-8").splitlines():
                    try:
                        if json.loads(line)["step"] <= self.step:
                            kept.append(line)
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a torn last line
            atomic_write(metrics, "".join(x + "\n" for x in kept).encode())
        else:
            atomic_write(metrics, b"")
            info: dict[str, Any] = {
                "config": self.config.to_dict(),
                "total_steps": self.total_steps,
                "device": str(self.device),
                "torch": torch.__version__,
                "method": self.method.describe(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            describe = getattr(self.data, "describe", None)
            if callable(describe):
                info["data"] = describe()
            describe = getattr(self.batch_order, "describe", None)
            if callable(describe):
                info["batch_order"] = describe()
            atomic_write_json(self.run_dir / RUN_INFO, info)

    def _open_tensorboard(self):
        if not self.config.tensorboard or self.run_dir is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1)

    # ------------------------------------------------------------------ fit
    def fit(self, *, resume: bool | str = False, stop_at_step: int | None = None) -> FitResult:
        """Train until ``config.steps`` (or epochs / time budget) are done.

        Args:
            resume: False starts fresh (refusing a run_dir that already holds
                checkpoints); True continues from the latest verified checkpoint (or
                starts fresh when there is none); a checkpoint name such as
                ``"step-000500"`` continues from that one. A missing, truncated or
                corrupt checkpoint raises :class:`CheckpointError` before anything is
                written.
            stop_at_step: stop (with a checkpoint) once this many steps are done.

        Raises:
            TrainingDiverged: the loss became NaN/Inf (the bad update is not applied).
            EmbeddingCollapse: the embeddings' spread stayed below
                ``config.collapse_std`` for ``config.collapse_patience`` steps.
        """
        threads_before = torch.get_num_threads()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        try:
            return self._fit(resume, stop_at_step)
        finally:
            torch.set_num_threads(threads_before)

    def _fit(self, resume: bool | str, stop_at_step: int | None) -> FitResult:
        t_call = time.perf_counter()
        cfg = self.config
        resumed = False
        if not self._started:
            if self.run_dir is not None:
                index = read_index(self.run_dir)
                if resume and (index is not None or isinstance(resume, str)):
                    name = resume if isinstance(resume, str) else None
                    weights, state, where = load_checkpoint(self.run_dir, name)
                    self.load_state_dict(weights, state, where)
                    self.last_checkpoint = where
                    resumed = True
                elif not resume and index is not None:
                    raise CheckpointError(
                        f"{self.run_dir} already holds checkpoints (latest "
                        f"{index.get('latest')}); pass fit(resume=True) to continue that run, "
                        f"or use a new run_dir")
            elif resume:
                raise ValueError("resume: needs a run_dir to resume from")
            if not resumed:
                self._fresh_start()
            if self.run_dir is not None:
                self._prepare_records(resumed)
            self._started = True

        start_step = self.step
        end_step = self.total_steps if stop_at_step is None else min(self.total_steps,
                                                                     int(stop_at_step))
        writer = self._open_tensorboard()
        metrics_file = open(self.run_dir / METRICS, "a", encoding="utf-8") \
            if self.run_dir is not None else None
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step,
                       desc=getattr(self.method, "name", "train"), unit="step",
                       dynamic_ncols=True)
        items_per_step = cfg.batch_size * cfg.accumulate
        last_loss: float | None = None
        stopped = "completed" if end_step == self.total_steps else "stop_at_step"
        self.method.train()
        self._loop_start, self._paused_s = time.perf_counter(), 0.0
        t_log, step_log = self._loop_start, self.step
        try:
            while self.step < end_step:
                if cfg.time_budget_s and self.elapsed_s + self._loop_time() >= cfg.time_budget_s:
                    stopped = "time_budget"
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum = None
                out = None
                for _ in range(cfg.accumulate):
                    batch = self._batch(self._next_indices())
                    with self._autocast():
                        out = self.method.loss(batch, generator=self.views_generator)
                    micro = out.loss if cfg.accumulate == 1 else out.loss / cfg.accumulate
                    micro.backward()
                    d = out.loss.detach()
                    loss_sum = d if loss_sum is None else loss_sum + d
                loss_value = float(loss_sum) / cfg.accumulate
                check_finite_loss(loss_value, self.step + 1, lr=lr, precision=cfg.precision,
                                  last_checkpoint=None if self.last_checkpoint is None
                                  else str(self.last_checkpoint))
                grad_norm = None
                if cfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.method.parameters(),
                                                               cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.images_seen += items_per_step
                last_loss = loss_value
                self.method.after_step(self.step / self.total_steps)
                spread = self.guard.update(out.embeddings, self.step)

                if self.step % cfg.log_every == 0 or self.step == end_step:
                    now = time.perf_counter()
                    rate = (self.step - step_log) * items_per_step / max(now - t_log, 1e-9)
                    t_log, step_log = now, self.step
                    record: dict[str, Any] = {
                        "step": self.step, "epoch": self.epoch, "loss": loss_value, "lr": lr,
                        "images_per_s": rate, "views_per_s": rate * self.views_per_item,
                        "elapsed_s": self.elapsed_s + self._loop_time(),
                    }
                    if spread is not None:
                        record["spread"] = spread
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    for k, v in out.metrics.items():
                        record[k] = float(v)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    if writer is not None:
                        for k, v in record.items():
                            if k != "step":
                                writer.add_scalar(k, v, self.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                        views_s=f"{rate * self.views_per_item:.0f}",
                                        refresh=False)
                if bar is not None:
                    bar.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                        and self.step < end_step:
                    t_pause = time.perf_counter()
                    self.save_checkpoint()
                    self._paused_s += time.perf_counter() - t_pause  # not training time
        finally:
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
            if writer is not None:
                writer.close()
        train_time = self._loop_time()
        self.elapsed_s += train_time
        self._loop_start = None
        steps_run = self.step - start_step
        if self.run_dir is not None and steps_run > 0:
            if self.last_checkpoint is None or \
                    self.last_checkpoint.name != step_dir_name(self.step):
                self.save_checkpoint()
            export_weights(self.run_dir, self.method.state_dict(), self.step,
                           metadata={"step": str(self.step)})
        images = steps_run * items_per_step
        rate = images / train_time if train_time > 0 else math.nan
        return FitResult(
            step=self.step, steps_run=steps_run, wall_time_s=time.perf_counter() - t_call,
            train_time_s=train_time, final_loss=last_loss, images_per_s=rate,
            views_per_s=rate * self.views_per_item, stopped=stopped,
            run_dir=None if self.run_dir is None else str(self.run_dir))
