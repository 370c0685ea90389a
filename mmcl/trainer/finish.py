"""Evaluation during and after training, the summary table, and the plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import torch

from mmcl import runs
from mmcl.config import Recipe
from mmcl.models import factory
from mmcl.trainer import fsdp
from mmcl.trainer.logs import RunLog
from mmcl.trainer.plots import write_plots

HEADLINE = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "image_retrieval_recall@5",
            "text_retrieval_recall@1", "text_retrieval_recall@5", "knn_acc1", "linear_probe_acc1")


def run_evals(recipe: Recipe, objective, model_cfg: dict, max_samples, model=None) -> List[dict]:
    """Evaluate the towers (`model`, default `objective.model`) on each eval dataset (its task read from its
    folder)."""
    import mmcl.eval as mmcl_eval  # evaluation never imports the trainer; the trainer imports evaluation lazily

    model = model or objective.model
    preprocess, tokenizer = factory.eval_preprocess(model), factory.make_tokenizer(model_cfg)
    device = next(model.parameters()).device
    results = []
    was_training = model.training
    model.eval()
    try:
        jobs = [(root, None if objective.uses_text else "knn") for root in recipe.eval.datasets]
        jobs += [(root, "retrieval") for root in recipe.eval.retrieval if objective.uses_text]
        for root, task in jobs:
            results.append(mmcl_eval.evaluate_dataset(model, preprocess, tokenizer, root, split=recipe.eval.split,
                                                      task=task, batch_size=recipe.eval.batch_size, device=device,
                                                      max_samples=max_samples))
    finally:
        model.train(was_training)
    return results


def eval_record(step: int, results: List[dict]) -> dict:
    record = {"step": step}
    for result in results:
        name = Path(result["dataset"]).name
        for key, value in result["metrics"].items():
            if isinstance(value, (int, float)):
                record[f"eval/{name}/{key}"] = float(value)
    return record


def evaluate(recipe: Recipe, objective, model_cfg: dict, step: int, accelerator, log: RunLog,
             max_samples=None) -> List[dict]:
    """Main process evaluates (capped by eval.max_samples); the others wait (or, under FSDP, first help
    gather a full copy of the towers)."""
    results = []
    model = fsdp.unsharded_model(recipe, objective) if recipe.eval.datasets and fsdp.is_sharded(objective) else None
    if accelerator.is_main_process and recipe.eval.datasets:
        with torch.no_grad():
            results = run_evals(recipe, objective, model_cfg, max_samples or recipe.eval.max_samples, model)
        log.write(eval_record(step, results))
    accelerator.wait_for_everyone()
    return results


def summary_table(summary: Dict) -> str:
    rows = [("steps", summary["steps"]), ("samples seen", summary["samples"]),
            ("final loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-"),
            ("skipped samples", sum(summary["skipped_samples"].values()))]
    rows += [(f"skipped: {kind}", n) for kind, n in sorted(summary["skipped_samples"].items()) if n]
    rows.append(("skipped steps (non-finite)", summary["skipped_steps"]))
    for result in summary["eval"]:
        for key in HEADLINE:
            value = result["metrics"].get(key)
            if isinstance(value, float) and math.isfinite(value):
                rows.append((f"{Path(result['dataset']).name} {key}", f"{value:.4f}"))
    width = max(len(str(k)) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {str(k).ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def finish(recipe: Recipe, objective, model_cfg: dict, state, accelerator, log: RunLog) -> dict:
    """Full final evaluation, summary.json, plots, and the console table (main process)."""
    results = evaluate(recipe, objective, model_cfg, state.step, accelerator, log, max_samples=None)
    log.close()
    run_dir = Path(recipe.train.output_dir)
    from mmcl.trainer.logs import read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir) if r.get("loss") is not None] if accelerator.is_main_process else []
    summary = {"run_dir": str(run_dir), "steps": state.step, "samples": state.samples,
               "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
               "skipped_samples": dict(state.skipped_samples), "skipped_steps": state.skipped_steps,
               "eval": results}
    if accelerator.is_main_process:
        runs.write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        summary["plots"] = {k: str(v) for k, v in write_plots(run_dir).items()}
        print(summary_table(summary))
    return summary
