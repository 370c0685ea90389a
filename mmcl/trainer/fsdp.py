"""Towers sharded over processes with FSDP2 (`torch.distributed.fsdp.fully_shard`), beside the feature cache.

`train.fsdp: true` (or `accelerate launch --use_fsdp`, which sets ACCELERATE_USE_FSDP) shards every image and
text tower of the objective: each transformer block is one FSDP unit (its parameters are gathered just before
it runs and freed after, its gradients reduce-scattered as soon as the backward pass leaves it), and each
tower's remaining parameters (patch embedding, norms, projections, the token embedding) are one more. The
model is never handed to `accelerator.prepare`; the trainer keeps its own step, so the feature cache works
unchanged: FSDP gathers a block's weights for every micro-batch's no-grad encode and re-encode, and
reduce-scatters after each micro-batch's backward pass, which keeps gradients sharded (the memory FSDP is for).

What stays replicated (the loss' temperature and bias, SSL heads, the text tower's small root parameters of
open_clip's CLIP) is averaged by `GradSync` like any parameter of an unsharded run.

Checkpoints hold full tensors: every process joins the gather (`full_state_dict`, `full_optimizer_state`), the
main process writes the same safetensors and state file an unsharded run writes, and loading cuts each full
tensor back to this process's shard (`shard_like`). Export, evaluation and resume therefore never see FSDP.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import torch
from torch import nn

BLOCK_CONTAINERS = ("resblocks", "blocks", "layer", "layers")  # open_clip, timm, HF encoders


def requested(recipe) -> bool:
    """`train.fsdp`, or `accelerate launch --use_fsdp` (Accelerate keeps no FSDP plugin on a CPU)."""
    return recipe.train.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def towers(objective: nn.Module) -> List[nn.Module]:
    """The image and text towers of every open_clip model in the objective, and copies of them (MoCo's key
    encoder): what FSDP shards."""
    import open_clip

    found: Dict[int, nn.Module] = {}
    visual_type = type(objective.model.visual)
    for module in objective.modules():
        if isinstance(module, (open_clip.CLIP, open_clip.CustomTextCLIP)):
            text = module.text if hasattr(module, "text") else module.transformer
            for tower in (module.visual, text, getattr(module, "token_embedding", None)):
                if tower is not None:
                    found.setdefault(id(tower), tower)
        elif type(module) is visual_type:
            found.setdefault(id(module), module)
    return list(found.values())


def blocks(tower: nn.Module) -> List[nn.Module]:
    """The transformer blocks of a tower: each becomes its own FSDP unit."""
    out = []
    for name, module in tower.named_modules():
        if name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS and isinstance(module, (nn.ModuleList, nn.Sequential)):
            out += list(module.children())
    return out


def shard(objective: nn.Module, device: torch.device) -> int:
    """Shard the towers in place over all processes; returns the number of FSDP units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    units = 0
    for tower in towers(objective):
        for block in blocks(tower):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
            units += 1
        fully_shard(tower, mesh=mesh, reshard_after_forward=reshard)
        units += 1
    return units


def is_sharded(module: nn.Module) -> bool:
    return any(is_dtensor(p) for p in module.parameters())


def split_param_groups(groups: List[dict]) -> List[dict]:
    """Sharded and replicated parameters in separate groups: the fused AdamW kernel takes one kind per call."""
    if not any(is_dtensor(p) for group in groups for p in group["params"]):
        return groups
    out = []
    for group in groups:
        for sharded in (True, False):
            params = [p for p in group["params"] if is_dtensor(p) == sharded]
            if params:
                out.append({**group, "params": params})
    return out


def local(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """This process's part of each tensor (the shard of a DTensor, a plain tensor itself)."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def full(value: Any) -> Any:
    """A full tensor for a DTensor (a collective: every process must call it in the same order)."""
    return value.full_tensor() if is_dtensor(value) else value


def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """`module.state_dict()` with every shard gathered into its full tensor (every process calls this)."""
    return {key: full(value) for key, value in module.state_dict().items()}


def full_optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with full tensors: what an unsharded run saves (every process calls this)."""
    saved = optimizer.state_dict()
    state = {index: {name: full(value) for name, value in per_param.items()}
             for index, per_param in sorted(saved["state"].items())}
    return {**saved, "state": state}


def distribute_like(value: torch.Tensor, like: Any) -> torch.Tensor:
    """Cut a full tensor into this process's shard of `like` (no communication: every process has it all)."""
    if not is_dtensor(like) or is_dtensor(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def shard_like(state_dict: Dict[str, torch.Tensor], module: nn.Module) -> Dict[str, torch.Tensor]:
    """A full state dict made ready for `module.load_state_dict` when the module is sharded."""
    current = module.state_dict()
    return {key: distribute_like(value, current.get(key)) for key, value in state_dict.items()}


def shard_optimizer_state(saved: dict, optimizer) -> dict:
    """A saved (full) optimizer state dict made ready for `optimizer.load_state_dict` of a sharded run."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_dtensor(p) for p in params):
        return saved
    state = {index: {name: distribute_like(value, params[int(index)]) if torch.is_tensor(value) and value.dim()
                     else value for name, value in per_param.items()}
             for index, per_param in saved["state"].items()}
    return {**saved, "state": state}


def unsharded_model(recipe, objective: nn.Module) -> nn.Module:
    """A full copy of `objective.model` on the main process for evaluation (every process joins the gather;
    the others get None)."""
    from mmcl.models import factory
    from mmcl.objectives import model_init_kwargs

    weights = full_state_dict(objective.model)
    if torch.distributed.get_rank() != 0:
        return None
    model, _ = factory.build_model(recipe.model, **model_init_kwargs(recipe))
    model.load_state_dict(weights)
    return model.to(next(iter(weights.values())).device)
