"""Cached gradients (GradCache; Gao et al., 2021): a large logical batch with the encoder
memory of one chunk.

A contrastive loss couples every embedding of a batch to every other one, so plain gradient
accumulation over small batches changes the objective (fewer negatives). GradCache keeps the
objective and splits only the encoder work:

1. embed all B inputs chunk by chunk **without** a graph (activations of one chunk at a
   time), saving each chunk's random state;
2. the loss sees all (B, D) embeddings at once; its backward pass gives dL/dz, (B, D)
   (with the tiled NT-Xent in ``nearfar.losses.tiled`` that step is memory-linear too);
3. re-embed each chunk **with** a graph under the same random state and autocast state,
   and backpropagate that chunk's slice of dL/dz into the parameters.

Here steps 1 and 3 are the forward and backward of one ``torch.autograd.Function``
(:class:`CachedGradients`), so a caller keeps the usual contract: build the loss, call
``loss.backward()`` once. The parameters are inputs of that one graph node, and its
backward returns their gradients summed over the chunks, so every parameter's gradient is
accumulated exactly once per backward pass. Under ``DistributedDataParallel`` that means
one bucketed all-reduce per step, not one per chunk: DDP's hooks sit on the parameters'
``AccumulateGrad`` nodes, and the per-chunk passes inside use ``torch.autograd.grad``,
which returns gradients without running those nodes.

What matches the plain computation, and what does not:

* Random draws inside the module (dropout) are replayed: each chunk's CPU (and CUDA) RNG
  state is saved before its no-grad pass and restored for its recompute, inside
  ``torch.random.fork_rng`` so the caller's random stream is left where the forward pass
  left it. Augmentations are drawn before embedding, once, so they are shared anyway.
* Autocast: the device type, dtype and enabled flag seen by the forward pass are re-entered
  for the recompute (a backward pass otherwise runs outside autocast).
* BatchNorm: batch statistics are per chunk, as in Gao et al. (the no-grad pass and the
  recompute see the same chunk, so they agree with each other, not with a full-batch
  BatchNorm). Running statistics are updated by the no-grad pass only, once per chunk; the
  recompute restores every norm layer's running buffers afterwards, so they are never
  updated twice. With ``chunk >= B`` nothing is chunked and the module runs plainly.
* Parameter gradients then equal those of embedding the same chunks with a graph and
  concatenating, to float rounding (tested in ``tests/test_grad_cache.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def _rng_devices(x: Tensor) -> list[int]:
    return [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
        if x.device.type == "cuda" else []


def _capture_rng(x: Tensor) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(_rng_devices(x)[0]) if x.device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def _replayed_rng(x: Tensor, state: tuple[Tensor, Tensor | None]):
    """Run the block under a saved RNG state; the caller's RNG is untouched afterwards."""
    devices = _rng_devices(x)
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], devices[0])
        yield


def _norm_buffers(module: nn.Module) -> list[Tensor]:
    """Running-statistics buffers of the norm layers in ``module`` (BatchNorm and any
    layer with ``track_running_stats``): the state a training-mode forward pass changes."""
    out: list[Tensor] = []
    for m in module.modules():
        if getattr(m, "track_running_stats", False):
            out.extend(b for b in m.buffers(recurse=False) if b is not None)
    return out


class CachedGradients(torch.autograd.Function):
    """Forward: ``fn`` over ``x`` chunk by chunk without a graph. Backward: per chunk,
    recompute with a graph and pull that chunk's output gradient back into ``x`` (when it
    needs a gradient) and ``params``. Use through :func:`cached_gradient_forward`."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[[Tensor], Tensor], chunk: int, module: nn.Module,
                x: Tensor, *params: Tensor) -> Tensor:
        device_type = x.device.type
        ctx.fn, ctx.chunk, ctx.module, ctx.module_params = fn, chunk, module, params
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type),
                        torch.get_autocast_dtype(device_type))
        ctx.rng = []
        outs = []
        for x_c in x.split(chunk):
            ctx.rng.append(_capture_rng(x))
            outs.append(fn(x_c))
        out = torch.cat(outs)
        if not isinstance(out, Tensor) or out.shape[0] != x.shape[0]:
            raise ValueError(f"fn: expected a tensor with {x.shape[0]} rows like x, got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out)}")
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        params = ctx.module_params
        want_x = ctx.needs_input_grad[3]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[4:]) if need]
        sums: list[Tensor | None] = [None] * len(wanted)
        grad_x = torch.zeros_like(x) if want_x else None
        buffers = _norm_buffers(ctx.module)
        saved = [b.clone() for b in buffers]
        device_type, enabled, dtype = ctx.autocast
        for k, (x_c, g_c) in enumerate(zip(x.split(ctx.chunk), grad_out.split(ctx.chunk))):
            x_c = x_c.detach().requires_grad_(want_x)
            with torch.enable_grad(), _replayed_rng(x, ctx.rng[k]), \
                    torch.autocast(device_type, dtype=dtype, enabled=enabled):
                z_c = ctx.fn(x_c)
            inputs = ([x_c] if want_x else []) + wanted
            grads = torch.autograd.grad(z_c, inputs, g_c.to(z_c.dtype), allow_unused=True)
            for b, s in zip(buffers, saved):   # the no-grad pass already updated them
                b.copy_(s)                     # (after the backward: BatchNorm saves them)
            if want_x:
                grad_x[k * ctx.chunk:k * ctx.chunk + len(x_c)] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:
                    sums[i] = g if sums[i] is None else sums[i].add_(g)
        it = iter(sums)
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[4:]]
        return (None, None, None, grad_x, *param_grads)


def cached_gradient_forward(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int, *,
                            module: nn.Module,
                            params: Sequence[Tensor] | None = None) -> Tensor:
    """``fn(x)`` for a large batch with the activation memory of ``chunk`` rows (GradCache).

    Args:
        fn: the embedding function, (n, ...) -> (n, D), row-wise apart from BatchNorm
            (e.g. ``lambda v: head(encoder(v))``); it must use only ``module``'s parameters
            (others get no gradient) and draw randomness only from the global RNG.
        x: (B, ...) inputs (augmented views; usually without a gradient).
        chunk: rows embedded at a time (>= 1); ``chunk >= B`` runs ``fn(x)`` plainly.
        module: owns the parameters (and the BatchNorm buffers) ``fn`` uses.
        params: the parameters to differentiate; None takes ``module``'s parameters that
            require a gradient.

    Returns:
        (B, D) embeddings, equal to ``torch.cat([fn(c) for c in x.split(chunk)])``, whose
        backward pass recomputes one chunk at a time (see the module docstring).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an integer >= 1, got {chunk!r}")
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"x: expected a (B, ...) tensor, got {type(x).__name__}")
    if chunk >= x.shape[0]:
        return fn(x)
    if not torch.is_grad_enabled():
        return torch.cat([fn(c) for c in x.split(chunk)])
    if params is None:
        params = [p for p in module.parameters() if p.requires_grad]
    return CachedGradients.apply(fn, chunk, module, x, *params)
