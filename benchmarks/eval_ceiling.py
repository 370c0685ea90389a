"""The ceiling of an evaluation: the same model doing the same work on tensors already in memory.

    PYTHONPATH=. python benchmarks/eval_ceiling.py --model local-dir:DIR --data ROOT --task TASK [--amp]

Reads the split once (untimed) into the exact inputs mmcl's evaluation gives the model: float image batches of
`--batch-size`, the tokens of every caption of those images (retrieval) or the class prompts in batches of
mmcl.eval.zeroshot.PROMPT_BATCH (zero-shot), each encoded as mmcl encodes it (mmcl.eval.features.encode_rows;
text cut after its last end-of-text token, mmcl.models.text).
Then times only the model over them, without autograd as mmcl runs it (mmcl.eval.features.inference; bf16
autocast with --amp), with the threads mmcl's policy picks for this model and `--workers` (mmcl.eval.threads:
every core for model-bound models, the cores the loaders would leave free for loading-bound ones), and with
glibc keeping freed memory as mmcl's evaluation does (mmcl.memory), so that mmcl / ceiling measures what
loading costs. One untimed warm-up call per tower first.
Prints one JSON line: {"seconds", "images", "images_per_s", "threads"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmcl import load_model, memory  # noqa: E402
from mmcl.eval.datasets import BatchPreprocess, SplitStream, describe_split  # noqa: E402
from mmcl.eval.features import encode_rows, inference  # noqa: E402
from mmcl.eval.threads import ThreadPolicy  # noqa: E402
from mmcl.models.text import text_encoder  # noqa: E402
from mmcl.eval.zeroshot import PROMPT_BATCH, class_prompts  # noqa: E402


def load_inputs(preprocess, tokenizer, root: str, task: str, batch_size: int):
    """([(images, tokens or None)], [prompt token batches]) of the test split, as mmcl batches them."""
    retrieval = task == "zeroshot_retrieval"
    info = describe_split(root, "test", "retrieval" if retrieval else "classification")
    pixels = BatchPreprocess(preprocess)
    stream = SplitStream(info.urls, pixels, batch_size, labels=not retrieval, captions=retrieval)
    batches = []
    for batch in stream:
        if batch["count"]:
            tokens = tokenizer([c for cs in batch["captions"] for c in cs]) if retrieval else None
            batches.append((pixels.finish(batch["pixels"]), tokens))
    flat = [] if retrieval else [p for c in info.classnames for p in class_prompts(c, info.templates)]
    prompts = [tokenizer(flat[i:i + PROMPT_BATCH]) for i in range(0, len(flat), PROMPT_BATCH)]
    return batches, prompts


def time_model(model, batches, prompts, amp: bool, workers: int) -> float:
    device = torch.device("cpu")
    ThreadPolicy.for_pass(device, workers).choose(model, batches[0][0])
    encode_text = text_encoder(model)  # captions cut after their end-of-text token, as mmcl does
    with inference(device, amp):
        model.encode_image(batches[0][0][:8], normalize=True)  # warm-up: first-call allocations
        encode_text((prompts[0] if prompts else batches[0][1])[:8], normalize=True)
        start = time.perf_counter()
        for tokens in prompts:
            encode_rows(encode_text, tokens).float()
        for images, tokens in batches:
            encode_rows(model.encode_image, images).float()
            if tokens is not None:
                encode_rows(encode_text, tokens).float()
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--task", required=True, choices=["zeroshot_classification", "zeroshot_retrieval"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--workers", type=int, default=2, help="the workers mmcl runs with (for its thread rule)")
    args = p.parse_args()
    memory.keep_freed_memory()
    model, preprocess, tokenizer = load_model(args.model, "cpu")
    batches, prompts = load_inputs(preprocess, tokenizer, args.data, args.task, args.batch_size)
    seconds = time_model(model.eval(), batches, prompts, args.amp, args.workers)
    images = sum(len(images) for images, _ in batches)
    print(json.dumps({"seconds": seconds, "images": images, "images_per_s": images / seconds,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
