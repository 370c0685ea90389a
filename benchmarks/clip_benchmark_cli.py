"""clip_benchmark 1.6.2's own command line, as a user runs it, with two additions for the benchmark.

    python benchmarks/clip_benchmark_cli.py eval --dataset wds/cifar10 --dataset_root ROOT ... (its flags)

- its `accuracy()` fails on numpy 2 (float() of a 1-element array): it is replaced by the same code with `[0]`;
- the seconds from building the dataset to the metrics (model loading excluded, as for mmcl's images/s) are
  written as JSON to the file named by $CB_TIMING.
Everything else is clip_benchmark's: its CLI, dataset builder, DataLoader, autocast and metrics.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings


def numpy2_accuracy(output, target, topk=(1,)):
    """clip_benchmark's accuracy() with `[0]` added: numpy 2 refuses float() of a 1-element array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / len(target)
            for k in topk]


def instrument(marks: dict) -> None:
    """Patch clip_benchmark to mark when it starts building the dataset and when each evaluation returns."""
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    zeroshot_classification.accuracy = numpy2_accuracy
    build = cli.build_dataset

    def timed_build(*args, **kwargs):
        marks.setdefault("start", time.perf_counter())
        return build(*args, **kwargs)

    cli.build_dataset = timed_build
    for module in (zeroshot_classification, zeroshot_retrieval):
        def evaluate(*args, _evaluate=module.evaluate, **kwargs):
            metrics = _evaluate(*args, **kwargs)
            marks["end"] = time.perf_counter()
            return metrics

        module.evaluate = evaluate


def main() -> None:
    warnings.filterwarnings("ignore")  # webdataset's shardshuffle notice
    marks: dict = {}
    instrument(marks)
    from clip_benchmark import cli

    sys.argv[0] = "clip_benchmark"
    cli.main()
    if os.environ.get("CB_TIMING") and "end" in marks:
        with open(os.environ["CB_TIMING"], "w") as f:
            json.dump({"eval_seconds": marks["end"] - marks["start"]}, f)


if __name__ == "__main__":
    main()
