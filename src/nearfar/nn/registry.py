"""Build encoders by name: ``build_encoder("small_cnn", in_channels=1)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from nearfar.nn.encoders import MLP, ResNet18, SmallCNN

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "mlp": MLP,
}


def register_encoder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding an encoder class or factory under ``name``."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ENCODERS and ENCODERS[name] is not factory:
            raise ValueError(f"encoder {name!r} is already registered ({ENCODERS[name]!r})")
        ENCODERS[name] = factory
        return factory

    return add


def build_encoder(name: str, **kwargs) -> nn.Module:
    """Construct a registered encoder; the keywords go to its constructor."""
    if name not in ENCODERS:
        raise ValueError(
            f"encoder {name!r}: unknown name; known encoders: {', '.join(sorted(ENCODERS))}"
        )
    try:
        return ENCODERS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"encoder {name!r}: bad keyword arguments {sorted(kwargs)} ({exc})") \
            from None


def resolve_encoder(encoder: nn.Module | str, encoder_kwargs: Mapping[str, Any] | None = None
                    ) -> nn.Module:
    """A method's ``encoder`` argument as a module: a registered name is built with
    ``encoder_kwargs``; a module is taken as is (``encoder_kwargs`` must then be empty)."""
    if isinstance(encoder, str):
        return build_encoder(encoder, **dict(encoder_kwargs or {}))
    if encoder_kwargs:
        raise ValueError("encoder_kwargs: only used when encoder is a name, got a module")
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"encoder: expected an nn.Module or a registered name, got "
                         f"{type(encoder).__name__}")
    return encoder


def parameter_count(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (optionally only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
