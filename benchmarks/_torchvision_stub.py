"""A stand-in for the two torchvision names that ``lightly.loss`` imports.

lightly 1.6 imports ``torchvision.ops.roi_align`` (for its dense relational losses)
and ``torchvision.ops.StochasticDepth`` (for ViT helpers) when ``lightly.loss`` is
imported, even though ``NTXentLoss`` uses neither. Installing torchvision would pull
a second torch build, so the benchmark process (and only it) puts this stand-in in
``sys.modules`` before importing lightly. Calling either name raises.

Never import this from the library or the tests: it exists for benchmarks/ alone.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _unavailable(name: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision.ops.{name} is a benchmark stand-in (benchmarks/_torchvision_stub.py); "
            "install torchvision to use it"
        )
    fail.__name__ = name
    return fail


class StochasticDepth:
    def __init__(self, *args, **kwargs):
        _unavailable("StochasticDepth")()


def install() -> bool:
    """Register the stand-in unless a real torchvision is importable.

    Returns:
        True if the stand-in was installed, False if a real torchvision exists.
    """
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    torchvision = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.roi_align = _unavailable("roi_align")
    ops.StochasticDepth = StochasticDepth
    torchvision.ops = ops
    torchvision.__version__ = "0.0.0+nearfar-benchmark-stub"
    sys.modules["torchvision"] = torchvision
    sys.modules["torchvision.ops"] = ops
    return True
