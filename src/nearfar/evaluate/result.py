"""A metric value that carries the protocol that produced it."""

from __future__ import annotations

from typing import Any


class Result(float):
    """A float that also records how it was measured, so a card can state it.

    It compares, formats and serialises (``json.dumps``) as the plain number;
    ``metric`` names it and ``protocol`` holds the settings (name, k, temperature,
    split sizes, ...). ``to_dict()`` gives the card's form:
    ``{"metric": ..., "value": ..., "protocol": {...}}``.
    """

    metric: str
    protocol: dict[str, Any]

    def __new__(cls, value: float, metric: str, protocol: dict[str, Any]) -> Result:
        obj = super().__new__(cls, value)
        obj.metric = metric
        obj.protocol = dict(protocol)
        return obj

    @property
    def value(self) -> float:
        return float(self)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": float(self), "protocol": dict(self.protocol)}

    def __repr__(self) -> str:
        return f"Result({float(self)!r}, metric={self.metric!r}, protocol={self.protocol!r})"

    def __reduce__(self):
        return (Result, (float(self), self.metric, self.protocol))
