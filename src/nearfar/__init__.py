"""nearfar: contrastive representation learning, from objective to governed retrieval.

    import nearfar
    run = nearfar.train()                 # SimCLR on bundled MNIST-5k (the default recipe)
    encoder = nearfar.load(run.run_dir)
    z = encoder.embed(images)             # (N, D), L2-normalised
"""

from typing import Any

__version__ = "0.1.0"

_API = ("train", "load", "evaluate_run", "Encoder", "RunResult")


def __getattr__(name: str) -> Any:
    # lazy: `import nearfar` stays cheap; torch loads on first use of the API
    if name in _API:
        from nearfar import api

        return getattr(api, name)
    raise AttributeError(f"module 'nearfar' has no attribute {name!r}")


__all__ = ["__version__", *_API]
