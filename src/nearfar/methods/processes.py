"""The ``gather`` / ``local_loss`` options every method shares for many processes.

``gather=None`` (the default) means: gather every rank's batch into the objective when
``torch.distributed`` is initialised with world size > 1, so that a run on W processes
of N items each trains on the objective of one process on W N items (negatives from
every rank, batch statistics over the global batch, one queue). ``True`` / ``False``
force it (``False``: each rank's objective sees its own batch only; DDP then averages
W independent per-rank objectives). ``local_loss=True`` makes each rank score only its
own anchors against every rank's candidates (less work per rank, same gradient); see
``nearfar.losses.infonce``.
"""

from __future__ import annotations

from typing import Any

from nearfar import distributed


def check_gather_option(value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"gather: expected None (automatic), True or False, got {value!r}")
    return value


def check_local_loss(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"local_loss: expected True or False, got {value!r}")
    return value


def gathering(option: bool | None) -> bool:
    """Whether to gather now: the option resolved against the current process group."""
    return distributed.resolve_gather(option)


def processes_card(option: bool | None, local_loss: bool | None = None) -> dict[str, Any]:
    """For ``describe()``: how the objective spans processes."""
    card: dict[str, Any] = {
        "gather": "auto (every process's batch when torch.distributed runs with world "
                  "size > 1)" if option is None else option,
    }
    if local_loss is not None:
        card["local_loss"] = local_loss
    return card
