"""Methods by name: ``build_method("simclr", encoder="small_cnn", temperature=0.2)``."""

from __future__ import annotations

from collections.abc import Callable

from nearfar.methods.base import Method

METHODS: dict[str, Callable[..., Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a :class:`Method` under ``name``."""

    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered ({METHODS[name]!r})")
        METHODS[name] = cls
        return cls

    return add


def available_methods() -> list[str]:
    return sorted(METHODS)


def build_method(name: str, **kwargs) -> Method:
    """Construct a registered method; the keywords go to its constructor."""
    if name not in METHODS:
        known = ", ".join(available_methods()) or "(none registered)"
        raise ValueError(f"method {name!r}: unknown name; known methods: {known}")
    try:
        return METHODS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"method {name!r}: bad keyword arguments {sorted(kwargs)} ({exc})") \
            from None
