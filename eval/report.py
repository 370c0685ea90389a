"""Reports of evaluation results: CLIP_benchmark-schema JSON, a markdown table, one PNG per result.

JSON per dataset: {"dataset", "model", "pretrained", "task", "metrics", "language"} exactly as CLIP_benchmark
writes it, plus an "mmcl" entry (split, samples, skipped samples, seconds, images/s) that readers of
CLIP_benchmark files ignore.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

RESERVED = ("dataset", "task", "metrics", "details")


def benchmark_record(result: Dict, model: str, pretrained: str = "", language: str = "en") -> Dict:
    """A result in CLIP_benchmark's schema."""
    extra = {k: v for k, v in result.items() if k not in RESERVED}
    return {"dataset": result["dataset"], "model": model, "pretrained": pretrained, "task": result["task"],
            "metrics": result["metrics"], "language": language, "mmcl": extra}


def result_stem(result: Dict) -> str:
    """File name stem of a result: dataset folder name and task."""
    name = result["dataset"].split("/", 1)[-1].replace("/", "_")
    return f"{name}_{result['task']}"


def _json_safe(value):
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(record: Dict, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(record), f, indent=1)
        f.write("\n")
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(results: Sequence[Dict]) -> str:
    """One table per task: a row per dataset, a column per metric, and images/s."""
    blocks = []
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        keys = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
        head = ["dataset", *keys, "images/s"]
        lines = [f"**{task}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["dataset"], *(_cell(r["metrics"].get(k, "")) for k in keys), f"{r['images_per_s']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_per_class(classnames: Sequence[str], recall: Sequence[float], title: str, path: str) -> str:
    """Bars of per-class accuracy (recall)."""
    plt = _pyplot()
    width = max(6.0, 0.3 * len(classnames))
    fig, ax = plt.subplots(figsize=(min(width, 40.0), 4))
    values = [0.0 if (v is None or math.isnan(v)) else v for v in recall]
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(classnames, rotation=90 if len(classnames) > 12 else 45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (recall)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


GEOMETRY_METRICS = ("alignment", "uniformity_image", "uniformity_text", "modality_gap", "mean_pair_cosine")
FAMILIES = ("accuracy", "recall@k", "ranks", "geometry")  # one plot panel each: values of one scale
FAMILY_LABELS = {"accuracy": "accuracy (0-1)", "recall@k": "recall@k (0-1)", "ranks": "rank (1 is best)",
                 "geometry": "geometry"}


def metric_family(name: str) -> Optional[str]:
    """The family of a metric name (a bare name or a path like `eval/flickr8k/acc1`); None: not plotted."""
    key = name.rsplit("/", 1)[-1]
    if "recall@" in key:
        return "recall@k"
    if key.endswith(("_mean_rank", "_median_rank")):
        return "ranks"
    if key in GEOMETRY_METRICS:
        return "geometry"
    if key.endswith(("acc1", "acc5", "mean_per_class_recall")):
        return "accuracy"
    return None


def by_family(names: Iterable[str]) -> Dict[str, List[str]]:
    """Metric names grouped by family, families in FAMILIES order, names in their given order."""
    groups = {family: [] for family in FAMILIES}
    for name in names:
        family = metric_family(name)
        if family is not None:
            groups[family].append(name)
    return {family: names for family, names in groups.items() if names}


def style_panel(ax, family: str) -> None:
    """Axis label and scale of a family's panel: fractions on [0, 1], ranks on a log axis."""
    ax.set_ylabel(FAMILY_LABELS[family])
    if family in ("accuracy", "recall@k"):
        ax.set_ylim(0, 1.02)
    elif family == "ranks":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _recall_panel(ax, curves: Dict[str, Dict[str, list]]) -> None:
    labels = {"image_retrieval": "text -> image", "text_retrieval": "image -> text"}
    for name, curve in curves.items():
        ax.plot(curve["k"], curve["recall"], marker=".", label=labels.get(name, name))
    ax.set_xlabel("k")
    style_panel(ax, "recall@k")
    ax.legend(fontsize=8)


def _bars_panel(ax, metrics: Dict[str, float], names: List[str], family: str) -> None:
    values = [metrics[n] if isinstance(metrics[n], (int, float)) and math.isfinite(metrics[n]) else 0.0
              for n in names]
    ax.bar(range(len(names)), values, color="tab:blue", label=family)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_retrieval", "").replace("_", " ") for n in names], rotation=30, ha="right",
                       fontsize=7)
    style_panel(ax, family)


def result_figure(result: Dict):
    """A retrieval result's figure: recall@k curves, then one bar panel per other metric family present."""
    plt = _pyplot()
    metrics = result["metrics"]
    families = {f: names for f, names in by_family(metrics).items() if f != "recall@k"}
    fig, axes = plt.subplots(1, 1 + len(families), figsize=(5 + 3.5 * len(families), 4), squeeze=False)
    _recall_panel(axes[0][0], result["details"]["recall_curve"])
    for ax, (family, names) in zip(axes[0][1:], families.items()):
        _bars_panel(ax, metrics, names, family)
    fig.suptitle(f"{result['dataset']} ({result['split']})")
    fig.tight_layout()
    return fig


def plot_result(result: Dict, path: str) -> Optional[str]:
    """The PNG of a result: per-class bars (classification), recall curves and ranks (retrieval); else None."""
    details, title = result.get("details", {}), f"{result['dataset']} ({result['split']})"
    if "per_class_recall" in details:
        return plot_per_class(details["classnames"], details["per_class_recall"], title, path)
    if "recall_curve" in details:
        fig = result_figure(result)
        fig.savefig(path, dpi=100)
        _pyplot().close(fig)
        return path
    return None


def write_reports(results: Iterable[Dict], out_dir: str, model: str, pretrained: str = "",
                  plots: bool = True) -> List[str]:
    """JSON (+ PNG) per result and `results.md` with the combined table, in `out_dir`; the paths written."""
    results = list(results)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for result in results:
        stem = os.path.join(out_dir, result_stem(result))
        written.append(write_json(benchmark_record(result, model, pretrained), stem + ".json"))
        if plots:
            png = plot_result(result, stem + ".png")
            written += [png] if png else []
    table = os.path.join(out_dir, "results.md")
    with open(table, "w", encoding="utf-8") as f:
        f.write(f"# Evaluation of {model}\n\n" + markdown_table(results))
    return written + [table]
