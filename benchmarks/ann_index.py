"""ANN search: `mmcl index build` against exact search and against autofaiss's own index at the same memory budget.

Two sets of vectors:
- synthetic: 1,000,000 L2-normalised 256-d vectors drawn around 2,000 random unit centres with spreads that vary
  by cluster (clustered, so nearest neighbours mean something), and 2,000 fresh queries from the same mixture;
- real: the image embeddings of CIFAR-10 (train + test) and Flickr8k (all splits) by `mmcl embed` with the
  flickr8k_clip_tiny recipe trained for 100 steps (128-d), queried by held-out captions (text -> image)
  and by images (image -> image).

Every index is built in a fresh process (mmcl: mmcl.search.index.build_index, exactly what `mmcl index build`
runs; autofaiss 2.18: `autofaiss.build_index` in its own environment, benchmarks/.autofaiss_env, because it
pins numpy < 2) and written to disk; this process then loads them all and measures them the same way: recall@10
against exact search on queries neither tool saw, median single-query latency on one thread (three rounds,
alternating between indexes, median of the rounds), size as faiss serialises it. Build time includes each
tool's own parameter search. Results: benchmarks/results/ann_index.json and the table printed at the end.

    python benchmarks/ann_index.py [--only synthetic real] [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH, REPO, RESULTS, SHARED_DATA, WORK, child_env, machine_info, read_json, say,  # noqa: E402
                    summarize, write_json)

AUTOFAISS_ENV = BENCH / ".autofaiss_env"
# autofaiss pins numpy < 2, and pyarrow >= 18 needs numpy 2; autofaiss calls faiss.OPQMatrix with keyword
# arguments, which faiss 1.15's bindings refuse (TypeError), so its environment keeps the faiss of its time.
AUTOFAISS_PINS = ["autofaiss==2.18.0", "pyarrow<18", "faiss-cpu==1.8.0.post1"]
OUT = WORK / "ann_index"


def autofaiss_python() -> Path:
    """The autofaiss environment's Python, made on first use (a venv from the package registry)."""
    python = AUTOFAISS_ENV / "bin" / "python"
    if not python.exists():
        say(f"making {AUTOFAISS_ENV} ({' '.join(AUTOFAISS_PINS)})")
        subprocess.run([sys.executable, "-m", "venv", str(AUTOFAISS_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *AUTOFAISS_PINS], check=True)
    return python


def clustered(n: int, d: int = 256, clusters: int = 2000, seed: int = 0) -> np.ndarray:
    """Normalised vectors around `clusters` unit centres; the noise norm varies by cluster from 0.5 to 1.0."""
    rng = np.random.default_rng(1234)  # the centres are the same for every seed: queries share the data's mixture
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.5, 1.0, clusters).astype(np.float32) / np.sqrt(d)
    rng, out = np.random.default_rng(seed), np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        owner = rng.integers(0, clusters, stop - start)
        block = centres[owner] + spread[owner, None] * rng.standard_normal((stop - start, d), dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


# ---- children: one index each, in a fresh process -------------------------------------------------------

def child(tool: str, vectors: str, tuning: str, budget: str, index_out: str, info_out: str) -> None:
    sys.path.insert(0, str(REPO))
    import faiss

    from mmcl.search import index as ix

    data = np.load(vectors)
    start = time.perf_counter()
    if tool == "exact":
        index = faiss.IndexFlatIP(data.shape[1])
        index.add(data)
        info = {"factory": "Flat", "search_params": {}}
    else:
        queries = dict(np.load(tuning))
        index, info = ix.build_index(data, queries, ix.parse_memory(budget), exact_below=0)
    info["seconds"] = time.perf_counter() - start
    faiss.write_index(index, index_out)
    Path(info_out).write_text(json.dumps(info))


REUSE = False  # set by --reuse


def build(tool: str, folder: Path, budget: str, tag: str) -> dict:
    """Build one index in a fresh process; returns its info (seconds, factory, parameters) and path."""
    index, info = folder / f"{tag}.faiss", folder / f"{tag}.json"
    if REUSE and index.is_file() and info.is_file():  # --reuse: an earlier run's complete build, measured again
        say(f"  {tag}: reused from {index}")
        return dict(json.loads(info.read_text()), path=str(index))
    if tool == "autofaiss":
        command = [str(autofaiss_python()), str(BENCH / "autofaiss_build.py"), str(folder / "vectors.npy"), budget,
                   str(index), str(info)]
    else:
        command = [sys.executable, __file__, "--child", tool, str(folder / "vectors.npy"), str(folder / "tuning.npz"),
                   budget, str(index), str(info)]
    log = folder / f"{tag}.log"
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(OMP_NUM_THREADS="2"))
    if done.returncode != 0:
        raise RuntimeError(f"{tool} build failed; see {log}")
    result = json.loads(info.read_text())
    say(f"  {tag}: {result.get('factory') or result.get('index_key')} in {result['seconds']:.1f} s")
    return dict(result, path=str(index))


# ---- measuring ----------------------------------------------------------------------------------------

def load(built: dict):
    import faiss

    index = faiss.read_index(built["path"])
    params = built.get("index_param") or ",".join(f"{k}={v}" for k, v in built.get("search_params", {}).items())
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    return index


def measure(vectors: np.ndarray, queries: dict, runs: dict, rounds: int = 3) -> dict:
    """recall@10 per query set, median latency over `rounds` alternating rounds, size, for every index."""
    from mmcl.search import index as ix

    exact = runs["exact"][0]
    flat = load(exact)
    truth = {name: ix.QuerySet.of(flat, q) for name, q in queries.items()}
    pooled = np.concatenate(list(queries.values()))
    pooled = pooled[np.random.default_rng(1).permutation(len(pooled))]
    indexes = {name: load(built[0]) for name, built in runs.items()}
    latency = {name: [] for name in runs}
    for _ in range(rounds):
        for name, index in indexes.items():
            latency[name].append(ix.median_latency_ms(index, pooled, budget_s=20.0, most=300))
    rows = {}
    for name, index in indexes.items():
        recall = {q: round(ix.recall_at_k(index.search(truth[q].queries, 10)[1], truth[q], vectors), 4) for q in truth}
        first = runs[name][0]
        rows[name] = {"factory": first.get("factory") or first.get("index_key"),
                      "params": first.get("index_param") or first.get("search_params"),
                      "recall_at_10": recall, "recall": min(recall.values()),
                      "latency_ms": summarize(latency[name]), "memory_mb": round(ix.index_bytes(index) / 2**20, 2),
                      "build_seconds": summarize([b["seconds"] for b in runs[name]]),
                      "mmcl_stored": {k: first[k] for k in ("recall_at_10", "latency_ms", "memory_bytes",
                                                            "target_recall") if k in first}}
    for row in rows.values():
        row["speedup_vs_exact"] = round(rows["exact"]["latency_ms"]["median"] / row["latency_ms"]["median"], 2)
    return rows


def run_set(name: str, vectors: np.ndarray, tuning: dict, queries: dict, budgets: dict, repeats: int) -> dict:
    """Build exact + mmcl (+ autofaiss) per budget, `repeats` times alternating, then measure."""
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "vectors.npy", vectors)
    np.savez(folder / "tuning.npz", **tuning)
    results = {}
    for budget, tools in budgets.items():
        say(f"{name}: {len(vectors)} x {vectors.shape[1]}, budget {budget}: {', '.join(tools)}")
        runs = {"exact": [build("exact", folder, budget, "exact")]}
        for repeat in range(repeats):
            for tool in (tools if repeat % 2 == 0 else tools[::-1]):
                runs.setdefault(tool, []).append(build(tool, folder, budget, f"{tool}_{budget}_{repeat}"))
        results[budget] = measure(vectors, queries, runs)
        say(json.dumps({tool: (row["factory"], row["recall"], row["latency_ms"]["median"], row["memory_mb"])
                        for tool, row in results[budget].items()}))
    return results


# ---- the two sets ---------------------------------------------------------------------------------------

def synthetic(quick: bool, n: int = 1_000_000, budgets=("512MB",), tools=("mmcl",)) -> dict:
    n = min(n, 100_000) if quick else n
    say(f"synthetic: {n} clustered vectors")
    vectors, queries = clustered(n, seed=0), clustered(2000, seed=1)
    # At 1M vectors autofaiss builds HNSW32 at budgets of 1.3 GB and more (minutes of graph building on 2 cores)
    # and OPQ + IVF16384_HNSW32 + PQ below (k-means over 16384 lists): long on this machine, so it runs only
    # when named (--synthetic-tools mmcl autofaiss); the real embeddings always compare both.
    budgets = {budget: list(tools) for budget in budgets}
    return {"vectors": n, "dim": 256, "queries": {"synthetic": 1000},
            "budgets": run_set("synthetic", vectors, {"synthetic": queries[:1000]}, {"synthetic": queries[1000:]},
                               budgets, repeats=1)}


def real_embeddings(quick: bool) -> dict:
    run, emb = OUT / "flickr8k_run", OUT / "real_emb"
    env = child_env()
    from mmcl import runs

    if runs.latest_checkpoint(run) is None:  # any complete checkpoint will do: ANN quality is not the point
        say("training flickr8k_clip_tiny for the real embeddings")
        subprocess.run([sys.executable, "-m", "mmcl", "train", "flickr8k_clip_tiny", f"train.output_dir={run}",
                        f"train.max_steps={60 if quick else 100}", "train.save_every=100", "eval.every=0",
                        "eval.datasets=[]", "train.progress=false"], check=True, env=env, cwd=REPO)
    data = [str(SHARED_DATA / "cifar10" / s) for s in ("train", "test")]
    data += [str(SHARED_DATA / "flickr8k" / s) for s in ("train", "dev", "test")]
    subprocess.run([sys.executable, "-m", "mmcl", "embed", "--model", str(run), "--data", *data, "--out", str(emb),
                    "--no-progress"], check=True, env=env, cwd=REPO)
    from mmcl.search import store

    loaded = store.load_embeddings(emb)
    images, captions = loaded["image"], loaded["text"]
    order = np.random.default_rng(0).permutation(len(captions))
    pick = np.random.default_rng(1).permutation(len(images))
    tuning = {"captions": captions[order[:500]], "images": images[pick[:500]]}
    queries = {"captions": captions[order[500:1500]], "images": images[pick[500:1500]]}
    budgets = {"64MB": ["mmcl", "autofaiss"], "6MB": ["mmcl", "autofaiss"]}
    return {"vectors": len(images), "dim": int(images.shape[1]), "captions": len(captions),
            "queries": {k: len(v) for k, v in queries.items()},
            "budgets": run_set("real", images, tuning, queries, budgets, repeats=1 if quick else 3)}


def table(results: dict) -> str:
    lines = ["| data | budget | index | tool | recall@10 (per query set) | median latency (ms) | vs exact | "
             "memory (MB) | build (s) |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    for data_name, data in results["sets"].items():
        for budget, rows in data["budgets"].items():
            for tool, row in rows.items():
                recall = ", ".join(f"{k} {v:.3f}" for k, v in row["recall_at_10"].items())
                lines.append(f"| {data_name} | {budget} | {row['factory']} {row['params'] or ''} | {tool} | {recall} | "
                             f"{row['latency_ms']['median']:.3f} | {row['speedup_vs_exact']:.1f}x | "
                             f"{row['memory_mb']:.1f} | {row['build_seconds']['median']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=("synthetic", "real"), default=["real", "synthetic"])
    parser.add_argument("--quick", action="store_true", help="100k synthetic vectors, one build each")
    parser.add_argument("--synthetic-n", type=int, default=1_000_000, help="synthetic vectors (default 1M)")
    parser.add_argument("--synthetic-budgets", nargs="+", default=["512MB"], help="e.g. 512MB 2GB")
    parser.add_argument("--synthetic-tools", nargs="+", choices=("mmcl", "autofaiss"), default=["mmcl"],
                        help="tools built on the synthetic set (autofaiss takes long at 1M vectors)")
    parser.add_argument("--reuse", action="store_true",
                        help="measure indexes an earlier run built completely (same data) instead of building again")
    parser.add_argument("--child", nargs=6, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    global REUSE
    REUSE = args.reuse
    autofaiss_python()
    out = "ann_index_quick.json" if args.quick else "ann_index.json"
    earlier = read_json(RESULTS / out) or {}
    results = {"machine": machine_info(), "command": " ".join(sys.argv), "sets": earlier.get("sets", {})}
    for name in args.only:  # a set run alone replaces only its own entry
        start = time.perf_counter()
        if name == "real":
            results["sets"][name] = real_embeddings(args.quick)
        else:
            results["sets"][name] = synthetic(args.quick, args.synthetic_n, args.synthetic_budgets,
                                              args.synthetic_tools)
        results["sets"][name].update(seconds=round(time.perf_counter() - start, 1), machine=machine_info())
        write_json(out, results)
    print(table(results))


if __name__ == "__main__":
    main()
