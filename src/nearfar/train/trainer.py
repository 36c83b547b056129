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

Many processes (``torchrun --nproc_per_node=N``, see :mod:`nearfar.train.launch`): the
method runs inside PyTorch's ``DistributedDataParallel`` (gradients averaged over the
processes in the backward pass). Every process draws the same global permutation from
the shared seed and takes its own disjoint slice of each global batch, so
``batch_size`` is per process and the optimizer sees ``batch_size * accumulate *
world_size`` items per step. Process 0 alone writes metrics, ``run.json``, the progress
bar, checkpoints and weights; a checkpoint holds every process's random states, and a
resume restores each process's own.
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
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from nearfar.distributed import all_gather_no_grad, is_distributed, rank, world_size
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
from nearfar.train.launch import init_distributed, process_device
from nearfar.train.rng import capture_global_rng, restore_global_rng, seed_everything
from nearfar.train.schedule import WarmupCosine

METRICS = "metrics.jsonl"
RUN_INFO = "run.json"
STATE_FORMAT = 1
# settings that must match for a resume to continue the same run
_RESUME_KEYS = ("batch_size", "accumulate", "optimizer", "seed", "warmup_steps", "lr")
# process r > 0 seeds its views and global generators at seed + r * stride (process 0 at
# seed, exactly like a single process), far from the seeds of neighbouring runs
RANK_SEED_STRIDE = 1_000_003


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
        world_size: processes that trained together (1 without torchrun); images
            and rates count every process's items.
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
    world_size: int = 1

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
    first = next(iter((getattr(data, "extras", None) or {}).values()), None)
    if images is None and isinstance(first, Tensor) and first.ndim >= 1:
        # text-only data (a TextPairDataset): the items are its extras; batches carry an
        # empty (B, 0) "images" tensor
        images = torch.zeros(first.shape[0], 0, dtype=torch.uint8)
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


class _LossModule(nn.Module):
    """The method's ``loss`` as ``forward``, so that ``DistributedDataParallel`` wraps one
    training step: it registers the gradient all-reduce for every parameter that needs a
    gradient (momentum copies, ``requires_grad=False``, are left to the method) and
    broadcasts process 0's buffers (BatchNorm statistics, queues) before each step."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, Any], generator: torch.Generator
                ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        out = self.method.loss(batch, generator=generator)
        # a tuple, not the StepOutput dataclass: DDP follows tuples and dicts to the loss
        return out.loss, out.embeddings, dict(out.metrics)


def _is_batch_stream(data: Any) -> bool:
    return isinstance(data, (torch.utils.data.IterableDataset, torch.utils.data.DataLoader))


class _BatchStream:
    """Batches for data larger than memory, read in order from an iterable of batch dicts
    (``images`` uint8 or float (B, C, H, W), optional ``labels``, ``index`` and further
    per-item tensors); the trainer's ``epoch`` counts passes, ``cursor`` batches of this
    pass."""

    def __init__(self, source: Any, cfg: TrainConfig) -> None:
        if cfg.epochs is not None:
            raise ValueError("TrainConfig.epochs: a stream of batches has no known length; "
                             "set steps instead")
        self.source, self.batch_size, self._it = source, cfg.batch_size, None

    def next_batch(self, trainer: Trainer) -> dict[str, Any]:
        while True:
            if self._it is None:
                target = getattr(self.source, "dataset", self.source)
                if callable(getattr(target, "set_epoch", None)):
                    target.set_epoch(trainer.epoch)
                self._it = iter(self.source)
                for _ in range(trainer.cursor):     # resumed: skip what this pass gave
                    next(self._it, None)
            batch = next(self._it, None)
            if batch is not None:
                break
            self._it = None
            if trainer.cursor == 0:
                raise ValueError("data: the stream yielded no batch in a whole pass; check "
                                 "its shards (and that this process gets some)")
            trainer.epoch, trainer.cursor = trainer.epoch + 1, 0
        trainer.cursor += 1
        x = batch.get("images") if isinstance(batch, dict) else None
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise ValueError(f"data: expected the stream to yield dicts with an 'images' "
                             f"tensor, got {type(batch).__name__}")
        if x.shape[0] != self.batch_size:
            raise ValueError(f"data: the stream yielded a batch of {x.shape[0]} items, "
                             f"expected TrainConfig.batch_size = {self.batch_size}; build the "
                             f"stream with that batch_size and drop_last=True")
        out = {k: v.to(trainer.device, non_blocking=True) if isinstance(v, Tensor) else v
               for k, v in batch.items()}
        out["images"] = out["images"].float().div_(255.0) if x.dtype == torch.uint8 \
            else out["images"].float()
        out.setdefault("labels", None)
        return out


class Trainer:
    """Trains any :class:`~nearfar.methods.Method` on an in-memory image dataset.

    Args:
        method: the method (an ``nn.Module`` with ``loss(batch, generator)``,
            ``after_step(progress)``, ``describe()``); moved to the device.
        data: an ``ImageDataset`` (uint8 or float images, optional labels), an
            (N, C, H, W) tensor, or, for data larger than memory, a stream of batch dicts
            (``nearfar.data.ShardStream`` or a ``DataLoader`` over one) of exactly
            ``batch_size`` items (build it with ``drop_last=True``); a stream needs
            ``steps`` (not ``epochs``), gets ``set_epoch(epoch)`` before every pass, and a
            resumed run skips the batches its interrupted pass had already given (exact
            when the stream is deterministic per epoch, as ``ShardStream`` is).
        config: a :class:`TrainConfig` (defaults if None).
        run_dir: directory for checkpoints, ``metrics.jsonl`` and ``run.json``; None
            records nothing (and cannot resume).
        batch_order: optional ``order(perm, batch_size) -> perm`` applied to each epoch's
            random permutation before it is cut into batches (a pure function of perm,
            so resuming stays exact), e.g. ``nearfar.data.DistinctGroupBatches`` to keep
            duplicates out of one batch. With several processes it gets the global
            batch size (``batch_size * world_size``).

    Launched by ``torchrun`` (``RANK`` / ``WORLD_SIZE`` in the environment) the Trainer
    joins the process group on construction (gloo on the CPU, NCCL on CUDA, see
    :mod:`nearfar.train.launch`) and trains with ``DistributedDataParallel``; every
    process must construct it with the same method, data and config.
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
        init_distributed(cfg.device)    # joins torchrun's process group; no-op otherwise
        self.world_size = world_size() if is_distributed() else 1
        self.rank = rank() if is_distributed() else 0
        self.device = process_device(cfg.device) if self.world_size > 1 \
            else resolve_device(cfg.device)

        self._stream = _BatchStream(data, cfg) if _is_batch_stream(data) else None
        images, labels, extras = _unpack_data(data) if self._stream is None else \
            (torch.zeros(0, 0, dtype=torch.uint8), None, {})   # streamed: nothing held
        self.n_items = int(images.shape[0])
        self.global_batch = cfg.batch_size * self.world_size
        if self._stream is None and self.global_batch > self.n_items:
            many = "" if self.world_size == 1 else \
                f" x {self.world_size} processes = {self.global_batch} items per global batch"
            raise ValueError(f"TrainConfig.batch_size: {cfg.batch_size}{many} is larger than "
                             f"the dataset ({self.n_items} items); use a smaller batch_size")
        on_device = cfg.data_on_device
        self._images = images.to(self.device) if on_device else images
        self._labels = None if labels is None else (labels.to(self.device) if on_device
                                                    else labels)
        self._extras = {k: v.to(self.device) if on_device else v for k, v in extras.items()}
        self.micro_per_epoch = self.n_items // self.global_batch
        if cfg.epochs is not None:
            self.total_steps = max(1, round(cfg.epochs * self.micro_per_epoch / cfg.accumulate))
        else:
            self.total_steps = cfg.steps

        if cfg.sync_batchnorm and self.world_size > 1:
            if self.device.type == "cpu":
                raise ValueError("TrainConfig.sync_batchnorm: PyTorch's SyncBatchNorm runs on "
                                 "GPUs only; train on CUDA, or set sync_batchnorm=false (each "
                                 "process then normalises over its own batch_size items)")
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
            self.method = method
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
                                               weight_decay=cfg.weight_decay,
                                               **({"fused": True} if cfg.fused_optimizer
                                                  else {}))
        self.scheduler = WarmupCosine(self.optimizer, total_steps=self.total_steps,
                                      warmup_steps=cfg.warmup_steps,
                                      min_lr_ratio=cfg.min_lr_ratio)
        self.data_generator = torch.Generator()
        self.views_generator = torch.Generator(device=self.device)
        self._ddp: DistributedDataParallel | None = None
        if self.world_size > 1:
            # find_unused_parameters: some methods leave parameters without a gradient on
            # some steps (DINO's frozen prototypes), which would otherwise stall the
            # all-reduce; the cost is one walk over the autograd graph per step
            self._ddp = DistributedDataParallel(
                _LossModule(method),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
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
        """This process's ``batch_size`` indices of the next global batch: every process
        draws the same permutation and takes its own slice (process r: items r*b..r*b+b-1
        of each global batch of b * world_size)."""
        bs = self.config.batch_size
        gb = self.global_batch
        if self.perm is None or self.cursor + gb > self.n_items:
            if self.perm is not None:
                self.epoch += 1
            self.perm = torch.randperm(self.n_items, generator=self.data_generator)
            if self.batch_order is not None:
                perm = self.batch_order(self.perm, gb)
                if not isinstance(perm, Tensor) or perm.shape != self.perm.shape:
                    raise ValueError(f"batch_order: expected a permutation of shape "
                                     f"({self.n_items},), got {getattr(perm, 'shape', perm)}")
                self.perm = perm
            self.cursor = 0
        start = self.cursor + self.rank * bs
        idx = self.perm[start:start + bs]
        self.cursor += gb
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
    def _rng_state(self) -> dict[str, Any]:
        """This process's random states: torch / python / numpy globals and the views."""
        return {**capture_global_rng(), "data": self.data_generator.get_state(),
                "views": self.views_generator.get_state()}

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as tensors and plain data (weights_only-safe).

        ``rng`` holds this process's random states; a checkpoint written by several
        processes also holds ``rank_rng``, every process's, in rank order.
        """
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "perm": self.perm,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self._rng_state(),
            "collapse_streak": self.guard.streak,
            "elapsed_s": self.elapsed_s + self._loop_time(),
            "images_seen": self.images_seen,
            "total_steps": self.total_steps,
            "n_items": self.n_items,
            "world_size": self.world_size,
            "config": self.config.to_dict(),
        }

    def _checkpoint_state(self) -> dict[str, Any]:
        """:meth:`state_dict` plus every process's random states (a collective: every
        process calls it; process 0's copy is the one written)."""
        state = self.state_dict()
        if self.world_size > 1:
            every: list[Any] = [None] * self.world_size
            dist.all_gather_object(every, state["rng"])
            state["rank_rng"] = every
        return state

    def _check_compatible(self, state: dict[str, Any], where: Path) -> None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world_size and not self.config.allow_world_size_change:
            bs = self.config.batch_size
            raise CheckpointError(
                f"{where}: written by {saved_world} process(es), but this run has "
                f"{self.world_size}; the global batch would change from {bs} x {saved_world} "
                f"to {bs} x {self.world_size} and the per-process random states would not "
                f"line up, so the resume would not continue the same run. Resume with "
                f"{saved_world} process(es) in all (torchrun --nproc_per_node / --nnodes), "
                f"or opt in with trainer.allow_world_size_change=true "
                f"(TrainConfig(allow_world_size_change=True)) to continue with "
                f"{self.world_size} (the data order carries on; processes beyond the "
                f"saved ones start fresh random states)")
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
        every = state.get("rank_rng") or [rng]
        self.data_generator.set_state(rng["data"])      # one data order for all processes
        if self.rank < len(every):
            restore_global_rng(every[self.rank])
            self.views_generator.set_state(every[self.rank]["views"])
        else:   # a process the checkpoint did not have (allow_world_size_change)
            self._seed_process(offset=int(state["step"]))
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.perm = state["perm"]
        self.guard.streak = int(state["collapse_streak"])
        self.elapsed_s = float(state["elapsed_s"])
        self.images_seen = int(state["images_seen"])

    def _seed_process(self, offset: int = 0) -> None:
        """This process's global and views generators: process 0 at ``seed`` and
        ``seed + 1`` (as a single process), process r at ``+ r * RANK_SEED_STRIDE``."""
        seed = self.config.seed + self.rank * RANK_SEED_STRIDE + offset
        seed_everything(seed)
        self.views_generator.manual_seed(seed + 1)

    def _fresh_start(self) -> None:
        self._seed_process()
        self.data_generator.manual_seed(self.config.seed)
        self.step = self.epoch = self.cursor = self.images_seen = 0
        self.perm = None
        self.elapsed_s = 0.0
        self.guard.streak = 0

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint (process 0; with several processes every one must call this,
        since it gathers their random states). Returns its directory."""
        if self.run_dir is None:
            return None
        state = self._checkpoint_state()
        if self.rank == 0:
            self.last_checkpoint = save_checkpoint(
                self.run_dir, self.step, self.method.state_dict(), state,
                keep=self.config.keep_checkpoints, metadata={"step": str(self.step)})
        else:
            self.last_checkpoint = self.run_dir / step_dir_name(self.step)
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
                "world_size": self.world_size,
                "global_batch_size": self.global_batch * self.config.accumulate,
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
        if not self.config.tensorboard or self.run_dir is None or self.rank != 0:
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

    def _find_checkpoint(self, resume: bool | str
                         ) -> tuple[dict[str, Tensor], dict[str, Any], Path] | None:
        """The verified checkpoint to continue from, None to start fresh, or an error."""
        if self.run_dir is None:
            if resume:
                raise ValueError("resume: needs a run_dir to resume from")
            return None
        index = read_index(self.run_dir)
        if resume and (index is not None or isinstance(resume, str)):
            name = resume if isinstance(resume, str) else None
            return load_checkpoint(self.run_dir, name)
        if not resume and index is not None:
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints (latest "
                f"{index.get('latest')}); pass fit(resume=True) to continue that run, "
                f"or use a new run_dir")
        return None

    def _shared_checkpoint(self, resume: bool | str
                           ) -> tuple[dict[str, Tensor], dict[str, Any], Path] | None:
        """:meth:`_find_checkpoint` on process 0, sent to every process, so that all
        continue from the same checkpoint (or all raise the same error), also when the
        run directory is on process 0's machine only."""
        if self.world_size == 1:
            return self._find_checkpoint(resume)
        payload: Any = None
        if self.rank == 0:
            try:
                payload = ("ok", self._find_checkpoint(resume))
            except (CheckpointError, ValueError) as exc:
                payload = ("error", type(exc), str(exc))
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        payload = box[0]
        if payload[0] == "error":
            raise payload[1](payload[2])
        return payload[1]

    def _agree_to_stop(self, mine: bool) -> bool:
        """True on every process when any wants to stop (the time budget is measured by
        each process's clock; all must leave the loop at the same step)."""
        if self.world_size == 1:
            return mine
        flag = torch.tensor([1.0 if mine else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _mean_over_processes(self, values: dict[str, Any]) -> dict[str, float]:
        """Metrics averaged over the processes (keys every process logged)."""
        mine = {k: float(v) for k, v in values.items()}
        if self.world_size == 1:
            return mine
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine)
        keys = [k for k in mine if all(k in d for d in every)]
        return {k: sum(d[k] for d in every) / self.world_size for k in keys}

    def _forward_backward(self, batch: dict[str, Any], accumulate: int, sync: bool
                          ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        """One micro-batch: the method's loss (through DDP with several processes; the
        gradient all-reduce runs on the last micro-batch of a step only), backward."""
        ddp = self._ddp
        with nullcontext() if ddp is None or sync else ddp.no_sync():
            with self._autocast():
                if ddp is None:
                    out = self.method.loss(batch, generator=self.views_generator)
                    loss, emb, metrics = out.loss, out.embeddings, out.metrics
                else:
                    loss, emb, metrics = ddp(batch, self.views_generator)
            (loss if accumulate == 1 else loss / accumulate).backward()
        return loss.detach(), emb, metrics

    def _fit(self, resume: bool | str, stop_at_step: int | None) -> FitResult:
        t_call = time.perf_counter()
        cfg = self.config
        lead = self.rank == 0           # the process that writes records and shows progress
        resumed = False
        if not self._started:
            found = self._shared_checkpoint(resume)
            if found is not None:
                weights, state, where = found
                self.load_state_dict(weights, state, where)
                self.last_checkpoint = where
                resumed = True
            else:
                self._fresh_start()
            if self.run_dir is not None and lead:
                self._prepare_records(resumed)
            self._started = True

        start_step = self.step
        end_step = self.total_steps if stop_at_step is None else min(self.total_steps,
                                                                     int(stop_at_step))
        writer = self._open_tensorboard()
        metrics_file = open(self.run_dir / METRICS, "a", encoding="utf-8") \
            if self.run_dir is not None and lead else None
        bar = None
        if cfg.progress and lead:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step,
                       desc=getattr(self.method, "name", "train"), unit="step",
                       dynamic_ncols=True)
        items_per_step = self.global_batch * cfg.accumulate
        last_loss: float | None = None
        stopped = "completed" if end_step == self.total_steps else "stop_at_step"
        self.method.train()
        self._loop_start, self._paused_s = time.perf_counter(), 0.0
        t_log, step_log = self._loop_start, self.step
        try:
            while self.step < end_step:
                if cfg.time_budget_s and self._agree_to_stop(
                        self.elapsed_s + self._loop_time() >= cfg.time_budget_s):
                    stopped = "time_budget"
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum = None
                emb = None
                metrics: dict[str, Any] = {}
                for micro in range(cfg.accumulate):
                    batch = self._batch(self._next_indices()) if self._stream is None \
                        else self._stream.next_batch(self)
                    d, emb, metrics = self._forward_backward(
                        batch, cfg.accumulate, sync=micro == cfg.accumulate - 1)
                    loss_sum = d if loss_sum is None else loss_sum + d
                if self.world_size > 1:
                    # the mean over processes; a NaN on any process reaches every process,
                    # so all stop together before the update
                    loss_sum = loss_sum.clone()
                    dist.all_reduce(loss_sum)
                loss_value = float(loss_sum) / (cfg.accumulate * self.world_size)
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
                if emb is not None and self.world_size > 1 and self.guard.threshold > 0:
                    emb = all_gather_no_grad(emb)   # one spread, one decision for all
                spread = self.guard.update(emb, self.step)

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
                    record.update(self._mean_over_processes(metrics))
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
        if self.world_size > 1:
            # each process's last forward updated its own BatchNorm statistics; all end
            # with process 0's (the ones written), as DDP gives them before every step
            for buf in self.method.buffers():
                dist.broadcast(buf, src=0)
        if self.run_dir is not None and steps_run > 0:
            if self.last_checkpoint is None or \
                    self.last_checkpoint.name != step_dir_name(self.step):
                self.save_checkpoint()
            if lead:
                export_weights(self.run_dir, self.method.state_dict(), self.step,
                               metadata={"step": str(self.step)})
        images = steps_run * items_per_step
        rate = images / train_time if train_time > 0 else math.nan
        return FitResult(
            step=self.step, steps_run=steps_run, wall_time_s=time.perf_counter() - t_call,
            train_time_s=train_time, final_loss=last_loss, images_per_s=rate,
            views_per_s=rate * self.views_per_item, stopped=stopped,
            run_dir=None if self.run_dir is None else str(self.run_dir),
            world_size=self.world_size)
