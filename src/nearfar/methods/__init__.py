"""Methods: each a small composition of losses, encoders and views, plus a registry."""

from nearfar.methods.base import Method, StepOutput
from nearfar.methods.registry import METHODS, available_methods, build_method, register_method
from nearfar.methods.simclr import SimCLR

__all__ = [
    "METHODS",
    "Method",
    "SimCLR",
    "StepOutput",
    "available_methods",
    "build_method",
    "register_method",
]
