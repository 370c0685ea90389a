"""Two-process check of mmcl's losses: run under ``torchrun --nproc_per_node 2 loss_worker.py OUT.json``.

Every rank builds the same seeded global batch (2 x ROWS rows), takes its own slice, puts it through a shared
linear "model" (so there are parameter gradients to average, as the trainer does), computes each loss and
backpropagates. Rank 0 writes, per case: the mean of the per-rank losses, the rank-averaged parameter
gradients (all_reduce_mean_, the trainer's convention) and the per-rank feature gradients gathered in rank
order. tests/test_losses_distributed.py runs :func:`run_case` on the whole batch in one process and compares.

This module is also imported by that test (for CASES and run_case), so it does nothing at import time.
"""

import json
import sys

import torch

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_mean_, get_rank
from mmcl.losses import ClipLoss, MoCoLoss, MoCoV3Loss, NTXentLoss, SigLipLoss
from mmcl.losses import NegativeWeighting, SupConLoss, TripletLoss, VSELoss

ROWS = 4  # per rank
IN_DIM, DIM = 10, 6
WORLD = 2


def _moco(image, text, t, bias):
    torch.manual_seed(7)  # the same initial queue on every rank and in the single-process run
    loss_fn = MoCoLoss(temperature=0.3, queue_size=3 * ROWS, dim=DIM)
    loss = loss_fn(image, text)
    loss_fn(image.detach(), text.detach())  # second enqueue of the global batch wraps around
    return loss, {"queue": loss_fn.queue, "queue_ptr": loss_fn.queue_ptr.float()}


# name -> (loss(image, text, t, bias) -> loss or (loss, extras), expected factors).
# Factors: how the rank-averaged gradient of the weight / of t and the per-rank feature gradient compare
# with one process on the global batch. See mmcl.distributed for the convention.
EXACT = {"weight": 1.0, "t": 1.0, "features": float(WORLD)}
CASES = {
    "clip": (lambda i, x, t, b: ClipLoss()(i, x, t.exp()), EXACT),
    "clip_local": (lambda i, x, t, b: ClipLoss(local_loss=True)(i, x, t.exp()), EXACT),
    "clip_chunked": (lambda i, x, t, b: ClipLoss(chunk_size=3)(i, x, t.exp()), EXACT),
    "clip_local_chunked": (lambda i, x, t, b: ClipLoss(local_loss=True, chunk_size=3)(i, x, t.exp()), EXACT),
    # open_clip's gather without autograd: only the own slice is live, so the weight gradient is 1/world.
    "clip_gather_no_grad": (lambda i, x, t, b: ClipLoss(gather_with_grad=False)(i, x, t.exp()),
                            {"weight": 1.0 / WORLD, "t": 1.0, "features": 1.0}),
    "siglip_ring": (lambda i, x, t, b: SigLipLoss("ring")(i, x, t.exp(), b), EXACT),
    "siglip_gather": (lambda i, x, t, b: SigLipLoss("gather")(i, x, t.exp(), b), EXACT),
    "ntxent": (lambda i, x, t, b: NTXentLoss(0.3, gather_distributed=True)(i, x), EXACT),
    "ntxent_chunked": (lambda i, x, t, b: NTXentLoss(0.3, gather_distributed=True, chunk_size=3)(i, x), EXACT),
    "moco_v3": (lambda i, x, t, b: MoCoV3Loss(0.3)(i, x, x, i), EXACT),
    "moco": (_moco, EXACT),
}


# ---- label-aware, hard-negative and ranking losses ---------------------------------------------------------
LABELS = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0])  # the classes of the global batch: several per class, across ranks
HCL = NegativeWeighting(beta=1.0, tau_plus=0.1)


def _labels(rows: int) -> torch.Tensor:
    """This rank's classes (all of them in the single-process run, where the rank is 0)."""
    return LABELS[get_rank() * rows:(get_rank() + 1) * rows]


CASES.update({
    "supcon": (lambda i, x, t, b: SupConLoss(0.3)(i, x, _labels(len(i))), EXACT),
    "supcon_chunked": (lambda i, x, t, b: SupConLoss(0.3, chunk_size=3)(i, x, _labels(len(i))), EXACT),
    "ntxent_hcl": (lambda i, x, t, b: NTXentLoss(0.3, gather_distributed=True, weighting=HCL)(i, x), EXACT),
    "ntxent_hcl_chunked": (lambda i, x, t, b: NTXentLoss(0.3, gather_distributed=True, chunk_size=3,
                                                         weighting=HCL)(i, x), EXACT),
    "ntxent_decoupled": (lambda i, x, t, b: NTXentLoss(0.3, gather_distributed=True,
                                                       weighting=NegativeWeighting(decoupled=True))(i, x), EXACT),
    "clip_hcl": (lambda i, x, t, b: ClipLoss(weighting=HCL)(i, x, t.exp()), EXACT),
    "clip_local_hcl_chunked": (lambda i, x, t, b: ClipLoss(local_loss=True, chunk_size=3, weighting=HCL)(
        i, x, t.exp()), EXACT),
    "clip_label_positives": (lambda i, x, t, b: ClipLoss()(i, x, t.exp(), classes=_labels(len(i))), EXACT),
    "clip_local_label_positives": (lambda i, x, t, b: ClipLoss(local_loss=True)(i, x, t.exp(),
                                                                                 classes=_labels(len(i))), EXACT),
    "vse_max": (lambda i, x, t, b: VSELoss(0.3, "max")(i, x), EXACT),
    "vse_sum": (lambda i, x, t, b: VSELoss(0.3, "sum")(i, x), EXACT),
    "triplet_hardest": (lambda i, x, t, b: TripletLoss(0.5, "hardest")(i, x), EXACT),
})


def global_batch():
    """The seeded inputs and parameters every rank (and the single-process reference) starts from."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(WORLD * ROWS, IN_DIM, generator=generator)
    text = torch.randn(WORLD * ROWS, IN_DIM, generator=generator)
    weight = torch.randn(IN_DIM, DIM, generator=generator).requires_grad_()
    t = torch.tensor(2.0, requires_grad=True)
    bias = torch.tensor(-1.5, requires_grad=True)
    return image, text, weight, t, bias


def run_case(name: str, rows: slice) -> dict:
    """Loss, parameter gradients and feature gradients for the given rows of the global batch."""
    image, text, weight, t, bias = global_batch()
    image_features, text_features = image[rows] @ weight, text[rows] @ weight
    image_features.retain_grad()
    text_features.retain_grad()
    out = CASES[name][0](image_features, text_features, t, bias)
    loss, extras = out if isinstance(out, tuple) else (out, {})
    loss.backward()
    grads = {"grad_" + key: (p.grad if p.grad is not None else torch.zeros_like(p))
             for key, p in (("weight", weight), ("t", t), ("bias", bias))}
    return {"loss": loss.detach(), **grads, "grad_image": image_features.grad,
            "grad_text": text_features.grad, **extras}


def distributed_result(name: str) -> dict:
    """run_case on this rank's slice, then the trainer's reductions: mean loss, mean parameter grads."""
    rank = get_rank()
    result = run_case(name, slice(rank * ROWS, (rank + 1) * ROWS))
    params = [result["loss"], result["grad_weight"], result["grad_t"], result["grad_bias"]]
    all_reduce_mean_(params)
    result["grad_image"] = all_gather_no_grad(result["grad_image"])
    result["grad_text"] = all_gather_no_grad(result["grad_text"])
    return {key: value.tolist() for key, value in result.items()}


def unequal_batch_error() -> str:
    """Each rank's ValueError message when rank 0 gathers 3 rows and rank 1 gathers 2."""
    try:
        all_gather_with_grad(torch.zeros(3 if get_rank() == 0 else 2, 4))
    except ValueError as error:
        return str(error)
    return "no error"


def main(out_path: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # initialises the gloo process group from torchrun's variables
    assert accelerator.num_processes == WORLD, f"expected {WORLD} processes, got {accelerator.num_processes}"
    results = {name: distributed_result(name) for name in CASES}
    errors = [None] * WORLD
    torch.distributed.all_gather_object(errors, unequal_batch_error())
    rank_values = [None] * WORLD
    torch.distributed.all_gather_object(rank_values, accelerator.process_index)
    if accelerator.is_main_process:
        with open(out_path, "w") as handle:
            json.dump({"cases": results, "unequal_errors": errors, "ranks": rank_values,
                       "backend": torch.distributed.get_backend()}, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    from mmcl.distributed import shutdown

    main(sys.argv[1])
    shutdown()
