"""Checkpoints that are written atomically and verified before they are trusted.

Layout of a run directory::

    run_dir/
      checkpoint.json          index: every kept checkpoint, its files' sizes and sha256
      step-000500/
        weights.safetensors    method.state_dict() (encoder, head, buffers)
        trainer_state.pt       optimizer, schedule, step, data order, every RNG state
      weights.safetensors      the weights at the end of the last fit() call (for use)
      run.json                 config, method and data descriptions (written once)
      metrics.jsonl            one line per logged step

A checkpoint directory is written under a temporary name, every file fsynced, then
renamed into place; only then is ``checkpoint.json`` (itself written to a temporary
file, fsynced and ``os.replace``d) updated to point at it. A crash at any moment
leaves the previous checkpoint and index intact. ``trainer_state.pt`` holds only
tensors and plain data and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from nearfar.durable import atomic_write, atomic_write_json, fsync_dir, sha256_file, write_synced

INDEX = "checkpoint.json"
WEIGHTS = "weights.safetensors"
STATE = "trainer_state.pt"
FORMAT = "nearfar-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not fit this run."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def weights_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                  ) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return safetensors_save(tensors, metadata=metadata)


def read_index(run_dir: Path) -> dict[str, Any] | None:
    """The parsed ``checkpoint.json`` of ``run_dir``, or None when there is none."""
    path = Path(run_dir) / INDEX
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is unreadable ({exc}); it is the index of this run's checkpoints. "
            f"Restore it from a backup, or start a fresh run in a new directory."
        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected a {FORMAT} index, got "
                              f"{str(index)[:80]!r}; start a fresh run in a new directory")
    return index


def _problem(directory: Path, entry: dict[str, Any]) -> str | None:
    """None when every file of a checkpoint entry matches its record, else why not."""
    for name, rec in entry["files"].items():
        path = directory / name
        if not path.exists():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != rec["bytes"]:
            kind = "truncated" if size < rec["bytes"] else "larger than recorded"
            return (f"{path} is {kind} ({_human(size)} of {_human(rec['bytes'])}; "
                    f"{size} of {rec['bytes']} bytes expected from {INDEX})")
        digest = sha256_file(path)
        if digest != rec["sha256"]:
            return (f"{path} is corrupt (sha256 {digest[:16]}..., expected "
                    f"{rec['sha256'][:16]}... from {INDEX}; size {size} bytes as expected)")
    return None


def verify_checkpoint(run_dir: Path, name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Find and verify a checkpoint; returns (its directory, its index entry).

    ``name`` picks one (``"step-000500"``); None takes the latest. A problem raises
    :class:`CheckpointError` naming the file, the expected and actual size or hash,
    the last good checkpoint if any, and what to do.
    """
    run_dir = Path(run_dir)
    index = read_index(run_dir)
    if index is None:
        raise CheckpointError(f"{run_dir} has no {INDEX}: there is no checkpoint to resume "
                              f"from; start with resume=False")
    entries = {e["dir"]: e for e in index["checkpoints"]}
    name = name or index["latest"]
    if name not in entries:
        raise CheckpointError(f"{run_dir / name} is not a checkpoint listed in "
                              f"{run_dir / INDEX}; listed: {', '.join(entries) or 'none'}")
    entry = entries[name]
    problem = _problem(run_dir / name, entry)
    if problem is None:
        return run_dir / name, entry
    good = None
    for other in sorted(index["checkpoints"], key=lambda e: -e["step"]):
        if other["step"] < entry["step"] and _problem(run_dir / other["dir"], other) is None:
            good = other
            break
    if good is not None:
        todo = (f"the last good checkpoint is {run_dir / good['dir']} (step {good['step']}): "
                f"resume from it with fit(resume={good['dir']!r}), or start a fresh run in a "
                f"new directory")
    else:
        todo = "no earlier good checkpoint is kept; start a fresh run in a new directory"
    raise CheckpointError(f"{problem}; {todo}. Nothing in {run_dir} was changed.")


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], *, keep: int,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write ``step-XXXXXX/`` atomically, update the index, prune to ``keep`` checkpoints."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_synced(tmp / WEIGHTS, weights_bytes(weights, metadata))
    buf = io.BytesIO()
    torch.save(trainer_state, buf)
    write_synced(tmp / STATE, buf.getvalue())
    files = {WEIGHTS: _file_record(tmp / WEIGHTS), STATE: _file_record(tmp / STATE)}
    fsync_dir(tmp)
    if final.exists():
        # never destroy an existing checkpoint (it may be evidence of a problem): set aside
        final.rename(run_dir / f"{name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(tmp, final)
    fsync_dir(run_dir)

    index = read_index(run_dir) or {"format": FORMAT, "checkpoints": []}
    old = [e for e in index["checkpoints"] if e["dir"] != name]
    # checkpoints past this step belong to an abandoned future (a resume from an earlier
    # step): keep their files, renamed, but drop them from the index
    later = [e for e in old if e["step"] >= step]
    entries = [e for e in old if e["step"] < step]
    entries.append({"dir": name, "step": step, "files": files,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    pruned, entries = entries[:-keep], entries[-keep:]
    index.update({"checkpoints": entries, "latest": name, "step": step})
    atomic_write_json(run_dir / INDEX, index)
    for e in later:
        if (run_dir / e["dir"]).exists():
            (run_dir / e["dir"]).rename(
                run_dir / f"{e['dir']}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    for e in pruned:
        shutil.rmtree(run_dir / e["dir"], ignore_errors=True)
    return final


def export_weights(run_dir: Path, weights: dict[str, torch.Tensor], step: int,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write ``run_dir/weights.safetensors`` atomically and record it in the index."""
    run_dir = Path(run_dir)
    path = run_dir / WEIGHTS
    atomic_write(path, weights_bytes(weights, metadata))
    index = read_index(run_dir) or {"format": FORMAT, "checkpoints": [], "latest": None}
    index["weights"] = {"path": WEIGHTS, "step": step, **_file_record(path)}
    atomic_write_json(run_dir / INDEX, index)
    return path


def load_checkpoint(run_dir: Path, name: str | None = None, *, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Verify, then read a checkpoint: (weights state_dict, trainer state, its directory)."""
    directory, _ = verify_checkpoint(run_dir, name)
    try:
        weights = safetensors_load((directory / WEIGHTS).read_bytes())
        state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # verified bytes that still do not parse: written by another tool
        raise CheckpointError(f"{directory}: files match {INDEX} but cannot be read ({exc}); "
                              f"start a fresh run in a new directory") from None
    return weights, state, directory


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file, checking it against the run's index when one is beside it.

    ``path`` may be a run directory (its ``weights.safetensors``, else the latest
    checkpoint's), a step directory, or a ``.safetensors`` file.
    """
    path = Path(path)
    if path.is_dir():
        run_dir = path if (path / INDEX).exists() else path.parent
        index = read_index(run_dir)
        if path == run_dir and index is not None and "weights" in index \
                and (path / WEIGHTS).exists():
            path = path / WEIGHTS
        elif path == run_dir and index is not None and index.get("latest"):
            return load_checkpoint(run_dir)[0]
        elif path != run_dir and index is not None:
            return load_checkpoint(run_dir, path.name)[0]
        else:
            path = path / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    index = read_index(path.parent)
    if index is not None and index.get("weights") and path.name == WEIGHTS:
        problem = _problem(path.parent, {"files": {WEIGHTS: index["weights"]}})
        if problem:
            latest = index.get("latest")
            hint = (f"the last checkpoint is {path.parent / latest}" if latest
                    else "no checkpoint is kept")
            raise CheckpointError(f"{problem}; {hint}")
    return safetensors_load(path.read_bytes())
