"""PNG plots of a run from its metrics.jsonl: loss, temperature, learning rate, evaluation metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from mmcl.train.logs import read_metrics  # noqa: E402


def series(records: List[dict], key: str) -> tuple:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return tuple(zip(*points)) if points else ((), ())


def plot_keys(records: List[dict], keys: List[str], title: str, path: Path, logy: bool = False) -> bool:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for key in keys:
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 20 else None)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_title(title)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def write_plots(run_dir: Path) -> Dict[str, Path]:
    """Write plots/{loss,temperature,lr,eval}.png; returns the files written."""
    records = read_metrics(run_dir)
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    keys = sorted({k for r in records for k in r})
    loss_keys = [k for k in keys if k == "loss" or k.startswith("loss/")]
    eval_keys = [k for k in keys if k.startswith("eval/")]
    plans = {"loss": (loss_keys, "training loss", False), "temperature": (["logit_scale"], "logit scale exp(t)", False),
             "lr": (["lr"], "learning rate", False), "eval": (eval_keys, "evaluation", False)}
    written = {}
    for name, (plot_keys_, title, logy) in plans.items():
        path = out / f"{name}.png"
        if plot_keys_ and plot_keys(records, plot_keys_, title, path, logy):
            written[name] = path
    return written
