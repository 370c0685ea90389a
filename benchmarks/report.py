"""The results table: one markdown table from the JSON files in benchmarks/results/, with its header.

    python benchmarks/report.py [--results benchmarks/results] [--no-write]

Columns: comparison | data | setting | mmcl | anchor | ratio | target | met?  A missing JSON gives a
"not run" row, so the table always lists every comparison of the suite. The table replaces what lies
between the `results:begin` / `results:end` markers of benchmarks/README.md and README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
RERUN = "python benchmarks/run_all.py"
Row = List[str]


def num(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def spread(summary: dict, digits: int = 1) -> str:
    """`median (min-max)` of a summary."""
    if not summary or summary.get("median") is None:
        return "-"
    if len(summary.get("values", [])) < 2:
        return num(summary["median"], digits)
    return f"{num(summary['median'], digits)} ({num(summary['min'], digits)}-{num(summary['max'], digits)})"


def met(flag: Optional[bool]) -> str:
    return "-" if flag is None else ("yes" if flag else "**no**")


def ratio_cell(comparison: dict) -> str:
    if not comparison or comparison.get("ratio") is None:
        return "-"
    paired = comparison.get("paired", {})
    if paired.get("values") and len(paired["values"]) > 1:
        return f"{comparison['ratio']:.2f}x ({paired['min']:.2f}-{paired['max']:.2f})"
    return f"{comparison['ratio']:.2f}x"


def throughput_rows(d: dict) -> List[Row]:
    s, summary = d["settings"], d["summary"]
    data = f"{Path(s['data']).name} shards"
    precision = "fp32" if str(s.get("precision", "fp32")) == "fp32" else "fp32 unless named"
    setting = (f"{s['recipe']}, batch {s['batch_size']}, {precision}, {s['workers']} workers, "
               f"{s['measured_steps']} steps x {s['repeats']}")
    rows = []
    for c in d["comparisons"]:
        anchor = spread(summary[c["anchor"]]) + (" (in memory)" if "in_memory" in c["anchor"] else "")
        target = "-" if c["target"] is None else f">= {c['target']}"
        rows.append([f"1 train samples/s: {c['label']}", data, setting, spread(summary[c["ours"]]), anchor,
                     ratio_cell(c), target, "-" if c["met"] is None else met(c["met"])])
    return rows


def budget_rows(d: dict) -> List[Row]:
    rows = []
    for task in d["tasks"].values():
        trainers = task["trainers"]
        m, o = trainers["mmcl"], trainers["open_clip_train"]
        threads = task.get("mmcl_threads", "torch default")
        variant = "" if threads == "torch default" else f" (mmcl with OMP_NUM_THREADS={threads})"
        setting = (f"{task['budget_seconds']:.0f} s budget, {task['recipe']}, batch {task['batch_size']}; steps "
                   f"{m.get('steps_done', '?')} vs {o.get('steps_done', '?')}, seconds used "
                   f"{m.get('seconds', 0):.0f} vs {o.get('seconds', 0):.0f}")
        for r in task["comparison"]:
            diff = "-" if r["difference"] is None else f"{r['difference']:+.3f} (2 SE {r['two_standard_errors']:.3f})"
            rows.append([f"2 {r['metric']} in a fixed budget{variant}", f"{r['dataset']} test", setting, num(r["mmcl"], 3),
                         num(r["open_clip_train"], 3), diff, "mmcl clearly ahead", met(r["clearly_ahead"])])
        rows += time_to_accuracy_rows(task)
        checks = {k: v for t in trainers.values() for k, v in t.get("clip_benchmark_max_difference", {}).items()}
        if checks:
            worst = max(checks.values())
            rows.append(["2 evaluator cross-check vs clip_benchmark", ", ".join(sorted(checks)), "same exports",
                         "mmcl eval", "clip_benchmark", f"max diff {worst:.1e}", "<= 1e-6", met(worst <= 1e-6)])
    return rows


def time_to_accuracy_rows(task: dict) -> List[Row]:
    """Seconds (training process start to checkpoint) each trainer needed to reach each target top-1."""
    t = task.get("time_to_accuracy") or {}
    if not t.get("targets"):
        return []
    cell = lambda r: f"{r['seconds']:.0f} s (step {r['step']})" if r else "not reached"  # noqa: E731
    points = {k: len(v) for k, v in t["curves"].items()}
    setting = (f"{task['budget_seconds']:.0f} s run, {task['recipe']}, batch {task['batch_size']}; "
               f"{points['mmcl']} vs {points['open_clip_train']} checkpoints scored")
    rows = []
    for r in t["targets"]:
        speedup = r.get("speedup")
        rows.append([f"2 time to zero-shot top-1 >= {r['target']:.2f}", "digits test", setting,
                     cell(r["reached"]["mmcl"]), cell(r["reached"]["open_clip_train"]),
                     f"{speedup:.2f}x faster" if speedup else "-", "mmcl faster", met(r["mmcl_faster"])])
    return rows


def loss_cell(r: dict) -> str:
    return r.get("status", "-") if r.get("status") != "ok" else f"{r['cpu_seconds']:.2f} s, {r['loss_peak_mb']:.0f} MB"


def loss_rows(d: dict) -> List[Row]:
    """Per B: mmcl chunked (and dense) against open_clip's ClipLoss, CPU time and loss peak memory."""
    by = {(r["mode"], r["batch"]): r for r in d["results"]}
    rows = []
    for batch in sorted({r["batch"] for r in d["results"]}):
        ours, dense, theirs = (by.get((mode, batch), {}) for mode in ("chunked", "dense", "open_clip"))
        ok = theirs.get("status") == ours.get("status") == "ok"
        ratio = f"{theirs['cpu_seconds'] / ours['cpu_seconds']:.2f}x faster, " \
                f"{theirs['loss_peak_mb'] / max(ours['loss_peak_mb'], 1):.1f}x less memory" if ok else "-"
        rows.append(["3 CLIP loss fwd+bwd: chunked (dense)", f"B = {batch:,}, d = {ours.get('dim', 512)}",
                     f"chunk {ours.get('chunk_size')}, CPU time, loss peak", f"{loss_cell(ours)} ({loss_cell(dense)})",
                     loss_cell(theirs), ratio, "-", "-"])
    s = d.get("summary", {})
    if "time_ratio_cpu_seconds" in s:
        rows.append(["3 chunked loss at the largest B", f"B = {s['largest_batch']:,}", "peak; time vs dense 8k x B^2",
                     f"{s['chunked_loss_peak_mb']} MB, {s['time_ratio_cpu_seconds']:.2f}x", "-", "-",
                     "< 2 GB, <= 1.5x", met(s["peak_under_2gb"] and s["time_within_1_5x"])])
    return rows


LOADING_BOUND = ("tiny32",)  # the sizes where loading dominates: the 1.5x target


def eval_rows(d: dict) -> List[Row]:
    """eval_vs_clip_benchmark.json: per cell, mmcl against clip_benchmark and against the model's ceiling."""
    rows = []
    for c in d["cells"].values():
        data, target = f"{c['dataset']} test ({c['images']:,} images)", 1.5 if c["size"] in LOADING_BOUND else 1.0
        setting = f"{c['size']}, {c['precision']}, batch {d['batch_size']}, {c['workers']} workers"
        mm, cb, ce = (c[tool]["images_per_s"] for tool in ("mmcl", "clip_benchmark", "ceiling"))
        rows.append(["4 eval images/s vs clip_benchmark", data, setting, spread(mm, 0), spread(cb, 0),
                     f"{c['speedup_images_per_s']:.2f}x, whole command {c['speedup_whole_command']:.2f}x "
                     f"(metric diff {c['metric_difference']:.0e})", f">= {target}",
                     met(c["speedup_images_per_s"] >= target)])
        rows.append(["4 eval images/s vs its ceiling", data, setting, spread(mm, 0), spread(ce, 0) + " (in memory)",
                     f"{c['of_ceiling']:.2f}", ">= 0.95", met(c["of_ceiling"] >= 0.95)])
    return rows


def thread_rows(d: dict) -> List[Row]:
    """eval_threads.json: the policy's pick (2 workers) against the best of the workers x threads grid."""
    rows = []
    for c in d["cells"]:
        by = {(r["workers"], r["threads"]): r["images_per_s"]["median"] for r in c["rows"]}
        best = max(by, key=by.get)
        picked = by[(2, c["policy"]["threads"])]
        rows.append(["4 eval thread policy vs the best setting", f"{c['dataset']} test ({c['images']:,} images)",
                     f"{c['size']}, fp32, 2 workers: {c['policy']['threads']} threads",
                     num(picked, 0), f"{num(by[best], 0)} ({best[0]} workers, {best[1]} threads)",
                     f"{picked / by[best]:.2f}", ">= 0.95 (set here)", met(picked / by[best] >= 0.95)])
    return rows


def ssl_rows(d: dict) -> List[Row]:
    t, p, s = d["throughput"], d["parity"], d["settings"]
    setting = f"{s['recipe']}, batch {s['batch_size']} x 2 views, in memory, {s['steps_per_block']} steps x {s['repeats']}"
    return [["5 SimCLR step samples/s vs lightly loop", "cifar10 train", setting, spread(t["summary"]["mmcl"]),
             spread(t["summary"]["lightly"]), ratio_cell(t), f">= {t['target']} (set here)", met(t["met"])],
            ["5 SimCLR loss parity vs lightly NTXentLoss", "cifar10 train", f"{s['parity_steps']} lock-step steps",
             f"{p['mmcl_losses'][0]:.5f}", f"{p['lightly_losses'][0]:.5f}",
             f"step 0 diff {p['first_step_difference']:.1e}, max {p['max_difference']:.1e}",
             f"<= {p['tolerance']:.0e} at step 0", met(p["met"])]]


EVIDENCE_KEYS = ("knn_acc1", "linear_probe_acc1", "image_retrieval_recall@5", "text_retrieval_recall@5")


def evidence_rows(d: dict) -> List[Row]:
    """ssl_evidence.json belongs to its own script: each trained run against the untrained towers."""
    rows = []
    for dataset, runs in d.get("results", {}).items():
        base = runs.get("untrained", {})
        for name, m in runs.items():
            if name == "untrained":
                continue
            keys = [k for k in EVIDENCE_KEYS if k in m][:2]
            cell = lambda r: ", ".join(f"{k} {r[k]:.3f}" for k in keys if k in r) or "-"
            diff = ", ".join(f"{m[k] - base[k]:+.3f}" for k in keys if k in base) or "-"
            rows.append([f"5 SSL evidence: {name} vs untrained towers", f"{dataset} test", f"{m.get('steps', '?')} steps",
                         cell(m), cell(base), diff, "above untrained", met(all(m[k] > base[k] for k in keys if k in base))])
    return rows


def gpu_rows(d: dict) -> List[Row]:
    if d.get("status") != "ok" and not str(d.get("status", "")).startswith("dry run"):
        return [["6 GPU: ViT-B/32 bf16 throughput, MFU, eval", "-", "-", d.get("status", "not run"), "-", "-",
                 "-", "-"]]
    s, rows = d["settings"], []
    setting = f"{s['model']}, batch {s['batch_size']}, bf16, {d['machine'].get('gpu') or 'CPU'}"
    e2e, anchor, ceiling = d["mmcl_end_to_end"], d["open_clip_train_end_to_end"], d["in_memory"]
    mfu = lambda r: f"{num(r.get('samples_per_s'), 0)} (MFU {r['mfu']:.0%})" if r.get("mfu") else num(r.get("samples_per_s"), 0)
    ratio_text = lambda v: f"{v:.2f}x" if v else "-"
    rows.append(["6 GPU train samples/s vs open_clip_train", Path(s["train_data"]).name, setting, mfu(e2e),
                 mfu(anchor) if anchor.get("samples_per_s") else anchor.get("status", "-"),
                 ratio_text(d["mmcl_vs_open_clip_train"]), "-", "-"])
    rows.append(["6 GPU pipeline efficiency", Path(s["train_data"]).name, setting, mfu(e2e), mfu(ceiling) + " (in memory)",
                 ratio_text(d["pipeline_efficiency"]), ">= 0.95", met((d["pipeline_efficiency"] or 0) >= 0.95)])
    ev = d.get("evaluation", {})
    if ev.get("mmcl_images_per_s"):
        rows.append(["6 GPU eval images/s vs clip_benchmark", Path(s["eval_data"]).name, "bf16 autocast",
                     num(ev["mmcl_images_per_s"], 0), num(ev["clip_benchmark_images_per_s"], 0),
                     f"{ev['speedup']:.2f}x (metric diff {ev['max_metric_difference']:.0e})", "-", "-"])
    return rows


def lit_rows(d: dict) -> List[Row]:
    """lit_budget.json: flickr8k_lit against CLIP from scratch, same budget, judged by clip_benchmark's CLI."""
    rows_by_name = {r["name"]: r for r in d["rows"]}
    lit, scratch = rows_by_name.get("flickr8k_lit"), rows_by_name.get("flickr8k_clip_tiny", {"metrics": {}})
    if lit is None:
        return [["7 LiT in a budget", "-", "-", "not run", "-", "-", "-", "-"]]
    rows = []
    for key, target in d["targets"].items():
        dataset, metric = key.split(" ")
        ours, theirs = lit["metrics"].get(dataset, {}).get(metric), scratch["metrics"].get(dataset, {}).get(metric)
        setting = (f"{d['budget_seconds']:.0f} s budget, clip_benchmark CLI on the copied export; "
                   f"used {lit['seconds']:.0f} vs {scratch.get('seconds', float('nan')):.0f} s")
        rows.append([f"7 LiT {metric} (flickr8k_lit vs flickr8k_clip_tiny)", f"{dataset} test", setting, num(ours, 3),
                     num(theirs, 3), f"{ours - theirs:+.3f}" if ours is not None and theirs is not None else "-",
                     f">= {target}", met(ours is not None and ours >= target)])
    return rows


SECTIONS = [("train_throughput.json", throughput_rows, "1 training throughput"),
            ("learning_budget.json", budget_rows, "2 learning in a fixed budget"),
            ("learning_budget_threads.json", budget_rows, None),
            ("loss_scaling.json", loss_rows, "3 loss scaling"),
            ("eval_vs_clip_benchmark.json", eval_rows, "4 evaluation vs clip_benchmark"),
            ("eval_threads.json", thread_rows, "4 evaluation thread policy"),
            ("ssl_throughput.json", ssl_rows, "5 SSL vs lightly"),
            ("ssl_evidence.json", evidence_rows, None),
            ("gpu_check.json", gpu_rows, "6 GPU check"),
            ("lit_budget.json", lit_rows, "7 LiT in a 10-minute budget")]


def section_rows(results: Path, name: str, builder: Callable, label: Optional[str]) -> List[Row]:
    data = common.read_json(results / name)
    if data is None:
        return [[label, "-", "-", f"not run (no {name})", "-", "-", "-", "-"]] if label else []
    try:
        return builder(data)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        return [[label or name, "-", "-", f"unreadable {name}: {type(err).__name__} {err}", "-", "-", "-", "-"]]


def header(results: Path) -> str:
    found = [common.read_json(results / name) for name, _, _ in SECTIONS]
    machines = [d["machine"] for d in found if d and isinstance(d.get("machine"), dict) and "cpu" in d["machine"]]
    m = machines[0] if machines else common.machine_info()
    dates = sorted(x.get("date", "") for x in machines if x.get("date"))
    when = f"{dates[0][:10]} to {dates[-1][:10]}" if dates and dates[0][:10] != dates[-1][:10] else (dates or ["-"])[0][:10]
    return (f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib', '?')} GiB, GPU: {m.get('gpu') or 'none'}; "
            f"load average {m.get('load_average', ['?'])[0]} at the start (the machine is shared).  \n"
            f"Versions: torch {m.get('torch')}, open_clip {m.get('open_clip')}, webdataset {m.get('webdataset')} "
            f"(open_clip_train: {m.get('webdataset_open_clip_train') or common.OPENCLIP_WEBDATASET}), "
            f"clip_benchmark {m.get('clip_benchmark')}, lightly {m.get('lightly')}, accelerate {m.get('accelerate')}; "
            f"mmcl {m.get('mmcl_commit', '?')}.  \nDate: {when}. Rerun: `{RERUN}` (`--quick` for a smoke run).\n")


def table(results: Path) -> str:
    lines = ["| comparison | data | setting | mmcl | anchor | ratio | target | met? |", "|---|---|---|---|---|---|---|---|"]
    for name, builder, label in SECTIONS:
        for row in section_rows(results, name, builder, label):
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


def render(results: Path) -> str:
    return header(results) + "\n" + table(results)


def replace_between_markers(path: Path, text: str) -> bool:
    """Put `text` between the markers of `path`; False when the file or its markers are missing."""
    if not path.is_file():
        return False
    content = path.read_text()
    if BEGIN not in content or END not in content:
        return False
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    return True


def write_all(results: Path, targets: List[Path]) -> str:
    text = render(results)
    for path in targets:
        if replace_between_markers(path, text):
            common.say(f"table written to {path}")
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=common.RESULTS)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    targets = [] if args.no_write else [common.BENCH / "README.md", common.REPO / "README.md"]
    print(write_all(args.results, targets))


if __name__ == "__main__":
    main()
