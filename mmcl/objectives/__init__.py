"""Objectives: small classes from a batch to named losses, sharing towers, heads and the InfoNCE core."""
from __future__ import annotations

from torch import nn

from mmcl.config import Recipe
from mmcl.objectives.base import Objective
from mmcl.objectives.clip import SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE, ClipObjective, SigLipObjective
from mmcl.objectives.moco import MoCoObjective
from mmcl.objectives.simclr import SimCLRObjective
from mmcl.objectives.slip import SlipObjective
from mmcl.objectives.xqueue import ClipQueueObjective
# objectives on labels and margins
from mmcl.objectives.supcon import PairwiseObjective, SupConObjective, TripletObjective
from mmcl.objectives.vse import VSEObjective

REGISTRY = {"clip": ClipObjective, "siglip": SigLipObjective, "simclr": SimCLRObjective, "moco": MoCoObjective,
            "slip": SlipObjective}
REGISTRY.update({"supcon": SupConObjective, "triplet": TripletObjective, "pairwise": PairwiseObjective,
                 "vse": VSEObjective})

# objectives without negatives and with prototypes
from mmcl.objectives.byol import BYOLObjective  # noqa: E402
from mmcl.objectives.pcl import PCLObjective  # noqa: E402
from mmcl.objectives.simsiam import SimSiamObjective  # noqa: E402
from mmcl.objectives.swav import SwAVObjective  # noqa: E402
from mmcl.objectives.vicreg import VICRegObjective  # noqa: E402

REGISTRY.update({"byol": BYOLObjective, "simsiam": SimSiamObjective, "vicreg": VICRegObjective,
                 "swav": SwAVObjective, "pcl": PCLObjective})


def model_init_kwargs(recipe: Recipe) -> dict:
    """Extra model construction arguments an objective needs (SigLIP's scale and bias)."""
    if recipe.objective.name == "siglip":
        return {"logit_scale": SIGLIP_INIT_SCALE, "logit_bias": SIGLIP_INIT_BIAS}
    return {}


def build_objective(recipe: Recipe, model: nn.Module) -> Objective:
    name = recipe.objective.name
    if name not in REGISTRY:
        raise ValueError(f"objective.name: {name} is not available (have: {', '.join(sorted(REGISTRY))})")
    if name == "clip" and recipe.objective.section("clip").cross_modal_queue:  # an option of CLIP
        return ClipQueueObjective(model, recipe)
    return REGISTRY[name](model, recipe)
