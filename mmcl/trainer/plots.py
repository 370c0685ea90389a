"""PNG plots of a run from its metrics.jsonl: loss, temperature, learning rate, evaluation metrics.

The evaluation plot has one panel per metric family (accuracy, recall@k, ranks, geometry: mmcl.eval.report's
families), so that ranks in the hundreds and recalls between 0 and 1 never share an axis.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from mmcl.trainer.logs import read_metrics  # noqa: E402


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


def eval_figure(records: List[dict]):
    """The evaluation metrics against the step, one panel per metric family; None without any."""
    from mmcl.eval.report import by_family, style_panel  # the trainer imports evaluation lazily

    keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    families = {f: [k for k in names if series(records, k)[0]] for f, names in by_family(keys).items()}
    families = {f: names for f, names in families.items() if names}
    if not families:
        return None
    fig, axes = plt.subplots(len(families), 1, figsize=(7, 2.8 * len(families)), sharex=True, squeeze=False)
    for ax, (family, names) in zip(axes[:, 0], families.items()):
        for key in names:
            steps, values = series(records, key)
            ax.plot(steps, values, label=key[len("eval/"):], marker="o" if len(steps) < 20 else None)
        style_panel(ax, family)
        ax.set_title(family, fontsize=9)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def write_plots(run_dir: Path) -> Dict[str, Path]:
    """Write plots/{loss,temperature,lr,eval}.png; returns the files written."""
    records = read_metrics(run_dir)
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    keys = sorted({k for r in records for k in r})
    loss_keys = [k for k in keys if k == "loss" or k.startswith("loss/")]
    plans = {"loss": (loss_keys, "training loss", False), "temperature": (["logit_scale"], "logit scale exp(t)", False),
             "lr": (["lr"], "learning rate", False)}
    written = {}
    for name, (plot_keys_, title, logy) in plans.items():
        path = out / f"{name}.png"
        if plot_keys_ and plot_keys(records, plot_keys_, title, path, logy):
            written[name] = path
    fig = eval_figure(records)
    if fig is not None:
        fig.savefig(out / "eval.png", dpi=110)
        plt.close(fig)
        written["eval"] = out / "eval.png"
    return written
