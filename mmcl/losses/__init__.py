"""mmcl's contrastive losses, all written on one InfoNCE core (:func:`info_nce`), plus SigLIP's sigmoid loss.

Public names: ClipLoss, SigLipLoss, NTXentLoss, MoCoLoss, MoCoV3Loss, info_nce, clamp_logit_scale,
init_logit_scale, alignment, uniformity; SupConLoss, NegativeWeighting (HCL / DCL / decoupled),
mochi_negatives, TripletLoss, PairwiseMarginLoss, VSELoss.
"""

from mmcl.losses.clip import (INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, ClipLoss, clamp_logit_scale,
                              init_logit_scale)
from mmcl.losses.geometry import alignment, uniformity
from mmcl.losses.infonce import diagonal_labels, info_nce, inverse_permutation, l2_normalize
from mmcl.losses.moco import MoCoLoss, MoCoV3Loss
from mmcl.losses.ntxent import NTXentLoss
from mmcl.losses.siglip import INIT_LOGIT_BIAS as SIGLIP_INIT_LOGIT_BIAS
from mmcl.losses.siglip import INIT_LOGIT_SCALE as SIGLIP_INIT_LOGIT_SCALE
from mmcl.losses.siglip import SigLipLoss

# label-aware, hard-negative and margin losses (Khosla 2020, Robinson 2021, Chuang 2020, Yeh 2022,
# Kalantidis 2020, Faghri 2018, Hadsell 2006)
from mmcl.losses.margin import PairwiseMarginLoss, TripletLoss, VSELoss
from mmcl.losses.mochi import mochi_negatives
from mmcl.losses.supcon import SupConLoss
from mmcl.losses.weighting import NegativeWeighting

__all__ = [
    "ClipLoss", "SigLipLoss", "NTXentLoss", "MoCoLoss", "MoCoV3Loss",
    "info_nce", "l2_normalize", "diagonal_labels",
    "INIT_LOGIT_SCALE", "MAX_LOGIT_SCALE", "init_logit_scale", "clamp_logit_scale",
    "SIGLIP_INIT_LOGIT_SCALE", "SIGLIP_INIT_LOGIT_BIAS",
    "alignment", "uniformity",
    # label-aware, hard-negative and margin losses
    "SupConLoss", "NegativeWeighting", "mochi_negatives", "inverse_permutation",
    "TripletLoss", "PairwiseMarginLoss", "VSELoss",
]
