"""Readable outputs: progress in log files (whole lines, no carriage returns), plots with one scale per panel."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
from tqdm import tqdm

from conftest import REPO, TINY_MODEL, export_open_clip, subprocess_env
from mmcl.eval.report import metric_family, result_figure
from mmcl.progress import LogProgress, progress_bar
from mmcl.trainer.plots import eval_figure, write_plots


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_progress_writes_a_line_per_tenth_at_most_every_five_seconds():
    clock, out = Clock(), io.StringIO()
    bar = LogProgress(total=1000, desc="cifar10/test", unit="img", file=out, clock=clock)
    for _ in range(100):  # 10 images every 0.5 s: 10% every 5 s
        clock.now += 0.5
        bar.update(10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10 and lines[0].startswith("cifar10/test: 100/1000 img (10%), 20.0 img/s, 5 s")
    assert lines[-1].startswith("cifar10/test: 1000/1000 img (100%)")


def test_log_progress_is_quiet_on_fast_passes_and_speaks_on_slow_ones():
    clock, out = Clock(), io.StringIO()
    with LogProgress(total=10_000, unit="img", file=out, clock=clock) as bar:  # a 2-second pass: one line
        for _ in range(40):
            clock.now += 0.05
            bar.update(250)
    assert out.getvalue().count("\n") == 1 and "10000/10000 img (100%)" in out.getvalue()
    clock, out = Clock(), io.StringIO()
    bar = LogProgress(total=None, unit="step", file=out, clock=clock)  # no total: a line a minute
    for _ in range(300):
        clock.now += 1.0
        bar.set_postfix({"loss": "2.345"})
        bar.update(1)
    assert out.getvalue().count("\n") == 5 and out.getvalue().splitlines()[0].endswith("loss=2.345")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_is_live_on_terminals_and_lines_elsewhere():
    assert isinstance(progress_bar(10, file=Terminal()), tqdm)
    assert isinstance(progress_bar(10, file=io.StringIO()), LogProgress)
    assert progress_bar(10, enabled=False).disable


@pytest.mark.slow
def test_eval_log_file_has_no_carriage_returns(tmp_path, digits_root):
    """`mmcl eval ... > log 2>&1` (stderr a file): a few whole lines, not a stream of redrawn bars."""
    export = export_open_clip(tmp_path / "export", TINY_MODEL)
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "mmcl", "eval", "all", "--model", f"local-dir:{export}", "--data",
                        digits_root, "--batch-size", "20", "--workers", "0"], cwd=REPO, env=subprocess_env(),
                       stdout=f, stderr=subprocess.STDOUT, check=True, timeout=300)
    text = log.read_text()
    assert "\r" not in text and "acc1" in text
    assert 1 <= sum(1 for line in text.splitlines() if line.startswith(("digits/test:", "classifier:"))) <= 12


# ---- plots -----------------------------------------------------------------------------------------

FAMILY_OF = {"acc1": "accuracy", "acc5": "accuracy", "mean_per_class_recall": "accuracy", "knn_acc1": "accuracy",
             "image_retrieval_recall@1": "recall@k", "text_retrieval_recall@5": "recall@k",
             "image_retrieval_mean_rank": "ranks", "text_retrieval_median_rank": "ranks",
             "alignment": "geometry", "uniformity_image": "geometry", "modality_gap": "geometry"}


def fake_records():
    records = []
    for step in (50, 100, 150, 200):
        record = {"step": step, "loss": 4.0 - step / 100}
        for key in FAMILY_OF:
            rank = "rank" in key
            value = 400.0 / step if rank else (-2.0 + step / 100 if "uniformity" in key else step / 250)
            record[f"eval/{'flickr' if 'retrieval' in key or key in ('alignment', 'uniformity_image', 'modality_gap') else 'digits'}/{key}"] = value
        records.append(record)
    return records


def panels(fig):
    """{family of the panel's lines: (labels, y-limits, y-scale)} from the figure's axes."""
    out = {}
    for ax in fig.axes:
        labels = [line.get_label() for line in ax.get_lines()] + [c.get_label() for c in ax.containers]
        families = {metric_family(label) or label for label in labels}
        assert len(families) == 1, f"one panel mixes {families}"
        out[families.pop()] = (labels, ax.get_ylim(), ax.get_yscale())
    return out


def test_metric_families():
    for key, family in FAMILY_OF.items():
        assert metric_family(key) == family and metric_family(f"eval/x/{key}") == family
    assert metric_family("eval/x/seconds") is None


def test_training_eval_plot_has_one_panel_per_family(tmp_path):
    import matplotlib.pyplot as plt

    fig = eval_figure(fake_records())
    found = panels(fig)
    assert set(found) == {"accuracy", "recall@k", "ranks", "geometry"} and len(fig.axes) == 4
    for family in ("accuracy", "recall@k"):
        labels, (low, high), scale = found[family]
        assert scale == "linear" and low == 0 and 1 <= high <= 1.05
    labels, (low, high), scale = found["ranks"]
    assert scale == "log" and high >= 8 and len(labels) == 2
    plt.close(fig)


def test_write_plots_draws_the_eval_curve(tmp_path):
    import json

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake_records()))
    written = write_plots(tmp_path)
    assert set(written) == {"loss", "eval"} and written["eval"].read_bytes()[:4] == b"\x89PNG"


def test_retrieval_result_figure_separates_recalls_ranks_and_geometry():
    import matplotlib.pyplot as plt

    metrics = {"image_retrieval_recall@1": 0.1, "text_retrieval_recall@1": 0.2, "image_retrieval_mean_rank": 120.0,
               "image_retrieval_median_rank": 40.0, "text_retrieval_mean_rank": 90.0,
               "text_retrieval_median_rank": 30.0, "alignment": 1.2, "modality_gap": 0.8}
    curve = {"k": [1, 2, 3], "recall": [0.1, 0.15, 0.2]}
    result = {"dataset": "wds/flickr8k", "split": "test", "metrics": metrics,
              "details": {"recall_curve": {"image_retrieval": curve, "text_retrieval": curve}}}
    fig = result_figure(result)
    kinds = {}
    for ax in fig.axes:
        bars = [patch.get_height() for c in ax.containers for patch in c]
        kinds[ax.get_ylabel()] = (bars, ax.get_ylim(), ax.get_yscale())
    assert set(kinds) == {"recall@k (0-1)", "rank (1 is best)", "geometry"}
    assert sorted(kinds["rank (1 is best)"][0]) == [30.0, 40.0, 90.0, 120.0] and kinds["rank (1 is best)"][2] == "log"
    assert kinds["recall@k (0-1)"][1] == (0, 1.02)
    plt.close(fig)


@pytest.mark.slow
def test_evaluating_during_training_draws_a_curve(tiny_recipe, digits_root, run_mmcl, tmp_path):
    """The quickstart's recipe evaluates every few steps; here a tiny run does it every 2 of its 6 steps."""
    import matplotlib.pyplot as plt

    from mmcl.config import load_recipe
    from mmcl.trainer.logs import read_metrics

    quick = load_recipe(str(REPO / "recipes" / "digits_clip_tiny.yaml"),
                        [f"data.train=[{digits_root}]", f"eval.datasets=[{digits_root}]", f"eval.retrieval=[{digits_root}]"])
    assert 0 < quick.eval.every and 4000 // quick.train.batch_size * quick.train.epochs // quick.eval.every >= 5
    recipe = tiny_recipe({"eval": {"datasets": [digits_root], "retrieval": [digits_root], "every": 2,
                                   "max_samples": 100, "batch_size": 50}})
    done = run_mmcl(["train", recipe])
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    steps = [r["step"] for r in read_metrics(run) if "eval/digits/acc1" in r]
    assert steps == [2, 4, 6]
    fig = eval_figure(read_metrics(run))
    found = panels(fig)
    assert set(found) == {"accuracy", "recall@k", "ranks"}
    assert all(len(line.get_xdata()) == 3 for ax in fig.axes for line in ax.get_lines())
    assert (run / "plots" / "eval.png").is_file()
    plt.close(fig)
