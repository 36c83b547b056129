"""Joining the process group ``torchrun`` sets up: one process per device, PyTorch's DDP.

``torchrun --nproc_per_node=N`` (``python -m torch.distributed.run``) starts N copies
of a program and tells each who it is through the environment:

    RANK          this process among all of them, 0 .. WORLD_SIZE - 1
    WORLD_SIZE    how many processes train together (over every machine)
    LOCAL_RANK    this process among those on its machine (picks its GPU)
    MASTER_ADDR, MASTER_PORT   where the processes meet (the rendezvous store)

:func:`init_distributed` reads them, checks them, and joins the default process group
once: ``gloo`` when training on the CPU, ``nccl`` on CUDA (process ``LOCAL_RANK`` on
``cuda:LOCAL_RANK``). Without these variables, or with ``WORLD_SIZE=1``, nothing is
joined and training is the plain single-process loop. ``nearfar train`` (and
``nearfar.fit``) call it for you; a script that drives :class:`~nearfar.train.Trainer`
itself can too, or leave it to the Trainer, which joins on construction when it finds
itself launched by ``torchrun``::

    from nearfar.train.launch import distributed

    with distributed("auto"):                    # joins, and leaves at the end
        Trainer(method, data, config, run_dir="runs/x").fit()

The gradient all-reduce, the buffer broadcast and the collectives are PyTorch's own
(``torch.nn.parallel.DistributedDataParallel``, ``torch.distributed``); this module
only joins and leaves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nearfar.distributed import rank as process_rank

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_joined_here = False    # whether this module created the default process group


class LaunchError(ValueError):
    """The launcher's environment (RANK, WORLD_SIZE, ...) is missing pieces or inconsistent."""


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is, as ``torchrun`` told it (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _int_var(env: Mapping[str, str], name: str, low: int) -> int:
    raw = env.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low:
        raise LaunchError(f"environment variable {name}: expected an integer >= {low}, got "
                          f"{raw!r}; start the processes with torchrun (it sets RANK, "
                          f"WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
    return value


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """This process's place in a ``torchrun`` launch, or None when not launched by one.

    Raises:
        LaunchError: some of the variables are set but not all, or they disagree
            (``RANK`` outside ``0 .. WORLD_SIZE - 1``, a non-integer port, ...).
    """
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
    if missing:
        raise LaunchError(f"environment: {' and '.join(missing)} not set while "
                          f"{'RANK' if 'RANK' in env else 'WORLD_SIZE'} is; start the "
                          f"processes with torchrun, or unset both for a single process")
    world = _int_var(env, "WORLD_SIZE", 1)
    rank = _int_var(env, "RANK", 0)
    if rank >= world:
        raise LaunchError(f"environment variable RANK: expected 0 .. {world - 1} for "
                          f"WORLD_SIZE={world}, got {rank}")
    local = _int_var(env, "LOCAL_RANK", 0) if "LOCAL_RANK" in env else rank
    if world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise LaunchError(f"environment variable {name}: not set, and WORLD_SIZE="
                                  f"{world} processes need it to meet; start them with "
                                  f"torchrun (--standalone on one machine, or "
                                  f"--rdzv-endpoint=HOST:PORT)")
        port = _int_var(env, "MASTER_PORT", 1)
    else:
        port = int(env["MASTER_PORT"]) if str(env.get("MASTER_PORT", "")).isdigit() else 0
    return LaunchEnv(rank=rank, world_size=world, local_rank=local,
                     master_addr=str(env.get("MASTER_ADDR", "")), master_port=port)


def local_rank() -> int:
    """This process's index on its machine: ``LOCAL_RANK``, else its rank."""
    raw = os.environ.get("LOCAL_RANK", "")
    return int(raw) if raw.isdigit() else process_rank()


def process_device(device: str | torch.device) -> torch.device:
    """The device this process trains on when there are several: ``"auto"`` and
    ``"cuda"`` become ``cuda:LOCAL_RANK`` (the CPU when CUDA is absent for ``"auto"``).

    Raises:
        ValueError: ``cuda:N`` named explicitly (every process would share one GPU),
            CUDA asked for but absent, or fewer GPUs than processes on this machine.
    """
    name = str(device)
    here = local_rank()
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        if name.startswith("cuda:"):
            raise ValueError(f"TrainConfig.device: {name!r} names one GPU for every process; "
                             f"under torchrun each process takes cuda:LOCAL_RANK, so use "
                             f"device='cuda' (or 'auto'), and CUDA_VISIBLE_DEVICES to choose "
                             f"the GPUs")
        raise ValueError(f"TrainConfig.device: expected 'auto', 'cpu' or 'cuda' under "
                         f"torchrun, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device: {name!r} requested but CUDA is not available; "
                         f"use device='cpu' (the gloo backend) or 'auto'")
    if here >= torch.cuda.device_count():
        raise ValueError(f"environment variable LOCAL_RANK: process {here} on this machine "
                         f"needs cuda:{here}, but only {torch.cuda.device_count()} GPU(s) are "
                         f"visible; start at most that many processes per machine "
                         f"(--nproc_per_node)")
    return torch.device("cuda", here)


def init_distributed(device: str | torch.device = "auto") -> bool:
    """Join the process group ``torchrun`` describes in the environment, once.

    Args:
        device: the training device setting ("auto", "cpu", "cuda"); it picks the
            backend: ``gloo`` for the CPU, ``nccl`` for CUDA.

    Returns:
        True when this process now trains with others (a group of > 1 processes is
        joined, now or before); False for a single process (no launcher, or
        ``WORLD_SIZE=1``), which changes nothing.

    Raises:
        LaunchError: the launcher's variables are missing pieces or inconsistent, or
            a group of another size is already joined.
        ValueError: the device does not fit a multi-process run (see
            :func:`process_device`).
    """
    global _joined_here
    env = launch_env()
    if dist.is_available() and dist.is_initialized():
        if env is not None and dist.get_world_size() != env.world_size:
            raise LaunchError(f"environment variable WORLD_SIZE: {env.world_size}, but this "
                              f"process already belongs to a group of "
                              f"{dist.get_world_size()}")
        return dist.get_world_size() > 1
    if env is None or env.world_size == 1:
        return False
    if not dist.is_available():
        raise LaunchError("torch.distributed is not available in this torch build; run a "
                          "single process (without torchrun)")
    dev = process_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", init_method="env://", rank=env.rank,
                                world_size=env.world_size, device_id=dev)
    else:
        dist.init_process_group("gloo", init_method="env://", rank=env.rank,
                                world_size=env.world_size)
    _joined_here = True
    return True


def shutdown_distributed(*, wait: bool = True) -> None:
    """Leave the process group if :func:`init_distributed` joined it (else do nothing).

    Args:
        wait: first wait until every process is done (a barrier), so that none tears
            down its connections while another still uses them; pass False when
            leaving on an error (the others may never arrive).
    """
    global _joined_here
    if _joined_here and dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
    _joined_here = False


@contextmanager
def distributed(device: str | torch.device = "auto") -> Iterator[bool]:
    """``with distributed(device) as many:`` joins (see :func:`init_distributed`) and
    leaves at the end, also on an error; ``many`` says whether there are others."""
    joined_before = dist.is_available() and dist.is_initialized()
    many = init_distributed(device)
    try:
        yield many
    except BaseException:
        if not joined_before:
            shutdown_distributed(wait=False)
        raise
    if not joined_before:
        shutdown_distributed()


__all__ = ["ENV_VARS", "LaunchEnv", "LaunchError", "distributed", "init_distributed",
           "launch_env", "local_rank", "process_device", "shutdown_distributed"]
