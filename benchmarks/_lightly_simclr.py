"""The lightly side of the SimCLR benchmarks: the recipe's encoder and views under lightly's
`SimCLRProjectionHead` and `NTXentLoss` in a plain PyTorch loop, as a lightly user writes
it (two forwards, `float(loss)` every step). Shared by `simclr_budget.py` and
`throughput.py`; the caller owns the learning-rate schedule."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def lightly_simclr(values: dict, images: torch.Tensor, *, channels_last: bool = False,
                   fused: bool = False):
    """(encoder, optimizer, step) for a recipe's values and uint8 (N, C, H, W) images;
    ``step()`` trains on one random batch and returns its loss. ImportError when lightly
    is not installed."""
    import _torchvision_stub

    _torchvision_stub.install()
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    import nearfar.api as api
    from nearfar.nn import build_encoder

    torch.manual_seed(values["seed"])
    enc_kw = {k: x for k, x in values["encoder"].items() if k != "name"}
    encoder = build_encoder(values["encoder"]["name"], in_channels=images.shape[1], **enc_kw)
    head = SimCLRProjectionHead(encoder.out_dim, values["method"].get("hidden_dim", 512),
                                values["method"].get("out_dim", 128))
    model = torch.nn.Sequential(encoder, head)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    criterion = NTXentLoss(temperature=values["method"].get("temperature", 0.5))
    views = api.build_views(values["views"])
    t = values["trainer"]
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"],
                            **({"fused": True} if fused else {}))
    bs = t["batch_size"]
    g = torch.Generator().manual_seed(values["seed"])

    def step() -> float:
        idx = torch.randint(0, len(images), (bs,), generator=g)
        x = images[idx].float() / 255
        with torch.no_grad():
            x1, x2 = views(x, g)
        loss = criterion(model(x1.contiguous(memory_format=fmt)),
                         model(x2.contiguous(memory_format=fmt)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return encoder, opt, step
