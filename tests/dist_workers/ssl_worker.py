"""Two-process check of the SSL objectives: run under ``torchrun --nproc_per_node 2 ssl_worker.py OUT.json``.

Every rank builds the same seeded objective on a tiny open_clip model and the same seeded global batch
(2 x ROWS rows), takes its own rows, and runs STEPS training steps the way the trainer does: before_step,
forward, backward, gradient averaging with all_reduce_mean_ (no DDP), after_step, then a plain SGD update.
Rank 0 writes, per case, the mean of the per-rank losses of each step, the averaged gradients of the last
step, and the queues and momentum copies at the end. tests/test_ssl_train.py runs :func:`run_case` on the
whole batch in one process and compares.

BatchNorm: torch has no SyncBatchNorm on CPU, and per-process BN statistics differ from the full batch's by
construction, so the SimCLR / MoCo v2 / SLIP cases use one-layer (BN-free) heads, and the MoCo v3 case, whose
projector ends in BN, runs with BN in eval mode (running statistics). GPU runs use SyncBN (see
mmcl.objectives.simclr.sync_batchnorm_).

This module is also imported by that test (for CASES and run_case), so it does nothing at import time.
"""

import json
import sys

import torch

from mmcl.config import ModelConfig, ObjectiveConfig, Recipe
from mmcl.objective_options import ClipOptions, MoCoOptions, SimCLROptions, SlipOptions, SwAVOptions, VICRegOptions
from mmcl.objective_options import HardNegatives, SupConOptions, VSEOptions
from mmcl.distributed import all_reduce_mean_, get_rank
from mmcl.models import build_model
from mmcl.objectives import build_objective
from mmcl.trainer.step import sync_gradients, trainable

ROWS = 4  # per rank
WORLD = 2
STEPS = 2
LR = 0.5
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}

# name -> (objective options, head sizes, BatchNorm in eval mode)
CASES = {
    "simclr": ({"name": "simclr", "simclr": SimCLROptions(temperature=0.2)}, [16], False),
    "moco_v2": ({"name": "moco", "moco": MoCoOptions(queue_size=12, momentum=0.9)}, [16], False),
    "moco_v3": ({"name": "moco", "moco": MoCoOptions(version=3, momentum=0.9)}, [32, 16], True),
    "slip": ({"name": "slip", "slip": SlipOptions(ssl_weight=0.5)}, [16], False),
    "clip_xqueue": ({"name": "clip", "clip": ClipOptions(cross_modal_queue=12, momentum=0.9)}, [16], False),
    # label-aware, hard-negative and ranking objectives
    "supcon": ({"name": "supcon", "supcon": SupConOptions(temperature=0.2)}, [16], False),
    "simclr_hcl": ({"name": "simclr", "simclr": SimCLROptions(temperature=0.2, hard_negatives=HardNegatives(1.0, 0.1))},
                   [16], False),
    "clip_hcl": ({"name": "clip", "clip": ClipOptions(hard_negatives=HardNegatives(0.5, 0.1))}, [16], False),
    "clip_label_positives": ({"name": "clip", "clip": ClipOptions(label_positives=True)}, [16], False),
    "vse": ({"name": "vse", "vse": VSEOptions(margin=0.3)}, [16], False),
    # global statistics (VICReg's variance and covariance) and global codes (SwAV's Sinkhorn, with a queue
    # that is full after the first step, prototypes frozen for that step, and two small crops)
    "vicreg": ({"name": "vicreg", "vicreg": VICRegOptions()}, [16], False),
    "swav": ({"name": "swav", "swav": SwAVOptions(prototypes=6, queue_size=8, freeze_prototypes_steps=1)}, [16],
             False),
}
SMALL_VIEWS = {"swav": 2}  # small 8 px views after the two large ones


def build(name: str):
    options, head, _ = CASES[name]
    torch.manual_seed(0)  # the same weights and initial queues on every rank and in the reference
    recipe = Recipe(model=ModelConfig(config=TINY, ssl_head=head), objective=ObjectiveConfig(**options))
    recipe.data.small_views, recipe.data.small_view_size = SMALL_VIEWS.get(name, 0), 8
    return build_objective(recipe, build_model(recipe.model)[0])


def global_batch(step: int, small: int = 0) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    rows = WORLD * ROWS
    return {"views": [torch.randn(rows, 3, 16, 16, generator=g) for _ in range(2)],
            "image": torch.randn(rows, 3, 16, 16, generator=g),
            "text": torch.randint(1, 64, (rows, 8), generator=g),
            "label": torch.randint(0, 3, (rows,), generator=g),
            **({"small": [torch.randn(rows, 3, 8, 8, generator=g) for _ in range(small)]} if small else {})}


def take(batch: dict, rows: slice) -> dict:
    views = batch["views"] + batch.get("small", [])
    return {"views": [v[rows] for v in views], "image": batch["image"][rows], "text": batch["text"][rows],
            "label": batch["label"][rows]}


def train_step(objective, batch: dict, step: int) -> torch.Tensor:
    """What mmcl.trainer.loop.optimizer_step does, with SGD in place of AdamW (one less state to compare)."""
    objective.before_step(step, STEPS)
    loss = objective(batch)["loss"]
    loss.backward()
    params = trainable(objective)
    sync_gradients(params)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(LR * p.grad)
    objective.after_step(step, STEPS)
    return loss.detach()


def run_case(name: str, rows: slice) -> dict:
    """Per-step losses, last gradients, and final queues / momentum copies for these rows of each batch."""
    objective = build(name)
    objective.train()
    if CASES[name][2]:
        for module in objective.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    losses = []
    for step in range(STEPS):
        for p in objective.parameters():
            p.grad = None
        losses.append(train_step(objective, take(global_batch(step, SMALL_VIEWS.get(name, 0)), rows), step))
    out = {"loss": torch.stack(losses)}
    out.update({"grad/" + k: p.grad for k, p in objective.named_parameters() if p.grad is not None})
    out.update({k: v.float() for k, v in objective.state_dict().items()
                if "queue" in k or k.startswith(("key_", "prototypes."))})
    return out


def distributed_result(name: str) -> dict:
    rank = get_rank()
    result = run_case(name, slice(rank * ROWS, (rank + 1) * ROWS))
    all_reduce_mean_([result["loss"]])  # the mean of the per-rank losses; gradients are averaged already
    return {key: value.tolist() for key, value in result.items()}


def main(out_path: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # initialises the gloo process group from torchrun's variables
    assert accelerator.num_processes == WORLD, f"expected {WORLD} processes, got {accelerator.num_processes}"
    results = {name: distributed_result(name) for name in CASES}
    if accelerator.is_main_process:
        with open(out_path, "w") as handle:
            json.dump({"cases": results, "world": accelerator.num_processes,
                       "backend": torch.distributed.get_backend()}, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    from mmcl.distributed import shutdown

    main(sys.argv[1])
    shutdown()
