"""Contrastive and non-contrastive objectives as pure functions on tensors."""

from .debiased import debiased_info_nce as debiased_info_nce
from .debiased import hard_negative_info_nce as hard_negative_info_nce
from .distillation import DinoCenter as DinoCenter
from .distillation import dino_loss as dino_loss
from .distillation import negative_cosine as negative_cosine
from .distillation import update_center as update_center
from .geometry import alignment as alignment
from .geometry import uniformity as uniformity
from .infonce import SELF as SELF
from .infonce import clip_loss as clip_loss
from .infonce import cpc_loss as cpc_loss
from .infonce import info_nce as info_nce
from .infonce import moco_loss as moco_loss
from .infonce import nt_xent as nt_xent
from .infonce import partner_index as partner_index
from .infonce import supcon as supcon
from .masks import same_value_mask as same_value_mask
from .redundancy import VicregTerms as VicregTerms
from .redundancy import barlow_twins as barlow_twins
from .redundancy import vicreg as vicreg
from .redundancy import vicreg_terms as vicreg_terms
from .sigmoid import SigLipParams as SigLipParams
from .sigmoid import siglip_loss as siglip_loss
from .temperature import LogitScale as LogitScale
from .temperature import Temperature as Temperature
