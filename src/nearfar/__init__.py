"""nearfar: contrastive representation learning, from objective to governed retrieval.

    import nearfar
    run = nearfar.fit()                   # SimCLR on bundled MNIST-5k (the default recipe)
    encoder = nearfar.load(run.run_dir)
    z = encoder.embed(images)             # (N, D), L2-normalised
"""

from typing import Any

__version__ = "0.1.0"

# `nearfar.train` is the training layer (a subpackage), so the one-call API is `fit`
_API = {"fit": "train", "load": "load", "evaluate_run": "evaluate_run", "Encoder": "Encoder",
        "RunResult": "RunResult"}


def __getattr__(name: str) -> Any:
    # lazy: `import nearfar` stays cheap; torch loads on first use of the API
    if name in _API:
        from nearfar import api

        return getattr(api, _API[name])
    raise AttributeError(f"module 'nearfar' has no attribute {name!r}")


__all__ = ["__version__", *_API]
