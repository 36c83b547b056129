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

# the other image objectives (issue 4); each registers itself on import
from nearfar.methods.barlow_twins import BarlowTwins  # noqa: E402
from nearfar.methods.byol import BYOL  # noqa: E402
from nearfar.methods.dino import DINO  # noqa: E402
from nearfar.methods.moco import MoCoV2, MoCoV3  # noqa: E402
from nearfar.methods.simsiam import SimSiam  # noqa: E402
from nearfar.methods.supcon import SupCon, SupConMixed  # noqa: E402
from nearfar.methods.vicreg import VICReg  # noqa: E402

__all__ += ["BYOL", "DINO", "BarlowTwins", "MoCoV2", "MoCoV3", "SimSiam", "SupCon",
            "SupConMixed", "VICReg"]

# Contrastive Predictive Coding (issue 4); registers "cpc"
from nearfar.methods.cpc import CPC  # noqa: E402

__all__ += ["CPC"]

# CLIP / SigLIP image-text (issue 4); registers "clip"
from nearfar.methods.clip import CLIP  # noqa: E402

__all__ += ["CLIP"]

# dual encoder for text pairs (issue 4); registers "dual_encoder"
from nearfar.methods.dual_encoder import DualEncoder  # noqa: E402

__all__ += ["DualEncoder"]
