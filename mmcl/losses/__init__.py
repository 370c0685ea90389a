"""mmcl's contrastive losses, all written on one InfoNCE core (:func:`info_nce`), plus SigLIP's sigmoid loss.

Public names: ClipLoss, SigLipLoss, NTXentLoss, MoCoLoss, MoCoV3Loss, info_nce, clamp_logit_scale,
init_logit_scale, alignment, uniformity.
"""

from mmcl.losses.clip import (INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, ClipLoss, clamp_logit_scale,
                              init_logit_scale)
from mmcl.losses.geometry import alignment, uniformity
from mmcl.losses.infonce import diagonal_labels, info_nce, l2_normalize
from mmcl.losses.moco import MoCoLoss, MoCoV3Loss
from mmcl.losses.ntxent import NTXentLoss
from mmcl.losses.siglip import INIT_LOGIT_BIAS as SIGLIP_INIT_LOGIT_BIAS
from mmcl.losses.siglip import INIT_LOGIT_SCALE as SIGLIP_INIT_LOGIT_SCALE
from mmcl.losses.siglip import SigLipLoss

__all__ = [
    "ClipLoss", "SigLipLoss", "NTXentLoss", "MoCoLoss", "MoCoV3Loss",
    "info_nce", "l2_normalize", "diagonal_labels",
    "INIT_LOGIT_SCALE", "MAX_LOGIT_SCALE", "init_logit_scale", "clamp_logit_scale",
    "SIGLIP_INIT_LOGIT_SCALE", "SIGLIP_INIT_LOGIT_BIAS",
    "alignment", "uniformity",
]
