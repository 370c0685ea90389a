"""faiss indexes for L2-normalised embeddings: exact inner product for small sets, otherwise an ANN index chosen
for a memory budget and tuned for a target recall@10, with its recall, latency and size measured and kept.

The choice follows autofaiss (`get_optimal_index_keys_v2`) step by step: the best index that fits the budget,
in the order HNSW (M up to 32) > IVF-Flat > IVF-SQ8 > OPQ + IVF-PQ (the largest PQ code that fits), sizes
estimated as autofaiss estimates them, and IVF with 2^round(log2(4 sqrt(N))) lists (faiss's guideline). Two
things differ, and they are why mmcl does not call autofaiss:
- autofaiss tunes the search parameter (efSearch / nprobe) for a query-time bound; mmcl tunes it for a
  target recall@10 against exact search: the smallest value whose recall on tuning queries reaches the
  target (+ TUNE_MARGIN), then measures recall and latency on held-out queries that played no part in it;
- autofaiss 2.18 pins numpy < 2 and pandas < 3 (and then needs pyarrow < 18 to import), which would
  downgrade the stack mmcl runs on; benchmarks/ann_index.py runs it in its own environment to compare.
mmcl also adds IVF-SQ8 (1 byte a dimension, near-exact scores) between IVF-Flat and PQ, and uses fewer IVF
lists than autofaiss for 1M-10M vectors (4096 instead of 16384 at 1M), which keeps k-means affordable on a
few cores.

faiss-gpu, where installed with a GPU, trains the IVF k-means and computes the exact neighbours on the GPU;
the index itself is kept and searched on the CPU.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

K = 10  # recall@K is what is tuned and reported
TUNE_MARGIN = 0.01  # tuning queries must reach target + margin, so held-out recall lands at the target
TIE_EPS = 1e-4  # a result scoring within this of the exact k-th score counts as found (ann-benchmarks' rule)
DEFAULT_EXACT_BELOW = 50_000  # below this many vectors a flat index answers a query in a few ms
DEFAULT_MAX_MEMORY = "4GB"
DEFAULT_TARGET_RECALL = 0.95
EF_SEARCH = [10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 1536, 2048]
NPROBE = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096]
PQ_SIZES = [128, 64, 48, 32, 24, 16, 8, 4]
ID_BYTES = 8  # an IVF list stores a 64-bit id per vector


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise ValueError("mmcl's index needs faiss: pip install 'mmcl[search]' (faiss-cpu), or faiss-gpu") from None
    return faiss


def parse_memory(text) -> int:
    """Bytes from `512MB`, `4GB`, `1.5G`, `300M`, `64KB` or a plain number of bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-memory: cannot read {text!r} (use e.g. 512MB, 4GB)")
    unit = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024 ** unit)


@dataclass
class Plan:
    key: str  # faiss index_factory string
    param: Optional[str]  # the search parameter tuned for recall: efSearch, nprobe, or None (exact)
    estimated_bytes: int

    @property
    def exact(self) -> bool:
        return self.param is None


def nlist_for(n: int) -> int:
    """IVF lists: the power of two nearest 4 sqrt(N), with at least 39 training vectors a list (faiss)."""
    lists = 2 ** round(math.log2(max(4 * math.sqrt(n), 1)))
    return int(max(1, min(lists, n // 39)))


def candidates(n: int, d: int) -> List[Plan]:
    """ANN indexes from the most to the least memory per vector, each with autofaiss's size estimate."""
    lists = nlist_for(n)
    centroids = lists * d * 4
    plans = [Plan(f"HNSW{m}", "efSearch", n * (4 * d + 2 * 4 * m)) for m in (32, 24, 16, 12, 8)]
    plans.append(Plan(f"IVF{lists},Flat", "nprobe", n * (4 * d + ID_BYTES) + centroids))
    plans.append(Plan(f"IVF{lists},SQ8", "nprobe", n * (d + ID_BYTES) + centroids))
    for m in (m for m in PQ_SIZES if m < d):
        out = (min(d // m, 6) + 1) * m  # autofaiss's OPQ output width: a multiple of m a little above d
        plans.append(Plan(f"OPQ{m}_{out},IVF{lists},PQ{m}x8", "nprobe", n * (m + ID_BYTES) + centroids + m * out * 4))
    return plans


def plan_index(n: int, d: int, max_memory: int, exact_below: int = DEFAULT_EXACT_BELOW) -> Plan:
    """Exact below `exact_below` vectors (when it fits); otherwise the first candidate that fits the budget."""
    flat = Plan("Flat", None, n * d * 4)
    if n < max(exact_below, 2) and flat.estimated_bytes <= max_memory:
        return flat
    if n < 2:
        raise ValueError("an ANN index needs at least 2 vectors")
    for plan in candidates(n, d):
        if plan.estimated_bytes <= max_memory and (plan.key.startswith("HNSW") or n >= 39 * nlist_for(n)):
            return plan
    smallest = min(candidates(n, d), key=lambda p: p.estimated_bytes)
    raise ValueError(f"--max-memory {_size(max_memory)} is too small for {n} vectors of width {d}: "
                     f"the smallest index ({smallest.key}) needs about {_size(smallest.estimated_bytes)}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB" if nbytes >= 2**20 else f"{nbytes / 1024:.1f} KB"


def _gpu(faiss) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def train_and_add(vectors: np.ndarray, plan: Plan, seed: int = 0):
    """The faiss index of `plan` over `vectors` (inner product), trained on a sample when it needs training."""
    faiss = faiss_module()
    index = faiss.index_factory(vectors.shape[1], plan.key, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        if _gpu(faiss) and "IVF" in plan.key:  # k-means on the GPU, the index stays on the CPU
            faiss.extract_index_ivf(index).clustering_index = faiss.index_cpu_to_all_gpus(
                faiss.IndexFlatL2(faiss.extract_index_ivf(index).d))
        lists = nlist_for(len(vectors))
        sample = np.random.default_rng(seed).permutation(len(vectors))[:max(64 * lists, 10_000)]
        index.train(vectors[np.sort(sample)])
    index.add(vectors)
    return index


def exact_search(vectors: np.ndarray):
    """A flat inner-product index over `vectors` for the ground truth (on a GPU when faiss has one), and the
    CPU one for timing."""
    faiss = faiss_module()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return (faiss.index_cpu_to_all_gpus(flat) if _gpu(faiss) else flat), flat


def set_param(index, plan: Plan, value: int) -> None:
    if plan.param is not None:
        faiss_module().ParameterSpace().set_index_parameter(index, plan.param, value)


@dataclass
class QuerySet:
    """Queries with the exact k-th best score of each, from exact search: the ground truth."""

    queries: np.ndarray
    kth: np.ndarray

    @classmethod
    def of(cls, exact, queries: np.ndarray, k: int = K) -> "QuerySet":
        return cls(queries, exact.search(queries, min(k, exact.ntotal))[0][:, -1])


def recall_at_k(found: np.ndarray, truth: QuerySet, vectors: np.ndarray) -> float:
    """recall@k as ann-benchmarks counts it: the share of the k results whose exact score reaches the k-th
    best exact score (less TIE_EPS). Equal to |found ∩ exact top-k| / k without ties, and it does not count
    as a miss a result that ties with the k-th (identical captions are common: the digits have 160)."""
    hits = 0
    for ids, query, kth in zip(found, truth.queries, truth.kth):
        ids = ids[ids >= 0]
        hits += int(np.sum(vectors[ids] @ query >= kth - TIE_EPS))
    return hits / (len(truth.queries) * found.shape[1]) if len(truth.queries) else float("nan")


def _recall(index, plan: Plan, value: int, truth: Dict[str, QuerySet], vectors: np.ndarray) -> float:
    """The lowest recall@k over the query sets at this search parameter."""
    set_param(index, plan, value)
    k = min(K, index.ntotal)
    return min(recall_at_k(index.search(q.queries, k)[1], q, vectors) for q in truth.values())


def tune(index, plan: Plan, truth: Dict[str, QuerySet], vectors: np.ndarray, target: float) -> Tuple[int, float, bool]:
    """The smallest search parameter whose recall@k reaches `target` on every query set (binary search, as
    autofaiss does over its range). When even the largest falls short (PQ codes cap recall), the smallest
    value within 0.005 of the best recall. Returns (value, recall at it, target reached)."""
    values = _param_values(index, plan)
    top = _recall(index, plan, values[-1], truth, vectors)
    goal, reached = (target, True) if top >= target else (top - 0.005, False)
    lo, hi = 0, len(values) - 1  # values[hi] meets the goal
    while lo < hi:
        mid = (lo + hi) // 2
        if _recall(index, plan, values[mid], truth, vectors) >= goal:
            hi = mid
        else:
            lo = mid + 1
    return values[hi], _recall(index, plan, values[hi], truth, vectors), reached


def _param_values(index, plan: Plan) -> List[int]:
    if plan.param == "nprobe":
        lists = faiss_module().extract_index_ivf(index).nlist
        return [v for v in NPROBE if v < lists] + [lists]
    return [v for v in EF_SEARCH if v >= K]


def median_latency_ms(index, queries: np.ndarray, k: int = K, budget_s: float = 5.0, most: int = 200) -> float:
    """Median wall time of single-query searches on one thread (as a server answers one request)."""
    faiss = faiss_module()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times, start = [], time.perf_counter()
    try:
        for query in queries[:most]:
            t0 = time.perf_counter()
            index.search(query[None], k)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > budget_s and len(times) >= 5:
                break
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.median(times) * 1e3)


def index_bytes(index) -> int:
    """The index's size as faiss serialises it (what it occupies in memory, within a few percent)."""
    return int(faiss_module().serialize_index(index).nbytes)


def split_queries(queries: Dict[str, np.ndarray], seed: int = 0, tune_n: int = 500,
                  held_n: int = 1000) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Per kind of query: up to `tune_n` tuning queries and up to `held_n` disjoint held-out ones."""
    rng, tuning, held = np.random.default_rng(seed), {}, {}
    for name, block in queries.items():
        if len(block) < 2:
            continue
        order = rng.permutation(len(block))
        half = min(len(block) // 2, tune_n)
        tuning[name] = np.ascontiguousarray(block[np.sort(order[:half])], np.float32)
        held[name] = np.ascontiguousarray(block[np.sort(order[half:half + held_n])], np.float32)
    if not held:
        raise ValueError("at least 2 query vectors are needed to tune and measure an index")
    return tuning, held


def _measure(index, exact, flat, vectors: np.ndarray, plan: Plan, held: Dict[str, np.ndarray], stats: dict) -> None:
    """Held-out recall@K per query kind (the lowest is the index's recall) and median query latencies."""
    if plan.exact:
        stats.update(recall_at_10=1.0, recall_by_queries={name: 1.0 for name in held})
    else:
        k = min(K, index.ntotal)
        by_kind = {name: round(recall_at_k(index.search(q, k)[1], QuerySet.of(exact, q), vectors), 4)
                   for name, q in held.items()}
        stats.update(recall_at_10=min(by_kind.values()), recall_by_queries=by_kind)
    pooled = np.concatenate(list(held.values()))
    pooled = pooled[np.random.default_rng(1).permutation(len(pooled))]
    stats["latency_ms"] = median_latency_ms(index, pooled)
    stats["exact_latency_ms"] = stats["latency_ms"] if plan.exact else median_latency_ms(flat, pooled)
    stats["speedup"] = stats["exact_latency_ms"] / stats["latency_ms"] if stats["latency_ms"] > 0 else None


def build_index(vectors: np.ndarray, queries: Dict[str, np.ndarray], max_memory: int,
                exact_below: int = DEFAULT_EXACT_BELOW, target: float = DEFAULT_TARGET_RECALL,
                seed: int = 0) -> Tuple[object, dict]:
    """Plan, build, tune and measure an index over normalised `vectors`; returns (faiss index, statistics).

    `queries` are named query sets (e.g. captions and images for an image index); each is split into
    tuning and held-out queries, and the recall@10 of each held-out set against exact search is measured.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if not 0 < target <= 1:
        raise ValueError(f"--target-recall must be in (0, 1], got {target}")
    plan = plan_index(n, d, max_memory, exact_below)
    start = time.perf_counter()
    index = train_and_add(vectors, plan, seed)
    stats = {"kind": "exact" if plan.exact else "ann", "factory": plan.key, "vectors": n, "dim": d,
             "metric": "inner_product", "max_memory_bytes": max_memory, "estimated_bytes": plan.estimated_bytes,
             "build_seconds": round(time.perf_counter() - start, 3), "target_recall": target, "search_params": {}}
    tuning, held = split_queries(queries, seed)
    exact = flat = index
    if not plan.exact:
        start = time.perf_counter()
        exact, flat = exact_search(vectors)
        goal = min(target + TUNE_MARGIN, 1.0)
        truth = {name: QuerySet.of(exact, q) for name, q in tuning.items()}
        value, tuned, reached = tune(index, plan, truth, vectors, goal)
        set_param(index, plan, value)
        stats.update(search_params={plan.param: value}, tuning_recall=tuned, target_reached=reached,
                     tune_seconds=round(time.perf_counter() - start, 3))
    stats["queries"] = {name: len(q) for name, q in held.items()}
    stats["tuning_queries"] = {name: len(q) for name, q in tuning.items()}
    _measure(index, exact, flat, vectors, plan, held, stats)
    stats["memory_bytes"] = index_bytes(index)
    return index, stats


def apply_params(index, stats: dict) -> None:
    """Set the tuned search parameters of a loaded index (faiss does not store efSearch / nprobe)."""
    faiss = faiss_module()
    for name, value in stats.get("search_params", {}).items():
        faiss.ParameterSpace().set_index_parameter(index, name, value)


def describe(name: str, stats: dict) -> str:
    """One line about an index for the console."""
    size = _size(stats["memory_bytes"])
    head = f"{name} index: {stats['vectors']} vectors, {stats['factory']}"
    if stats["kind"] == "exact":
        return f"{head} (exact), {size}, built in {stats['build_seconds']:.1f} s, {stats['latency_ms']:.2f} ms/query"
    params = ", ".join(f"{k}={v}" for k, v in stats["search_params"].items())
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in stats["recall_by_queries"].items())
    note = "" if stats.get("target_reached", True) else " (target out of reach: raise --max-memory)"
    return (f"{head} {params}: recall@10 {stats['recall_at_10']:.3f} ({kinds}; target {stats['target_recall']}"
            f"{note}), {stats['latency_ms']:.3f} ms/query vs exact {stats['exact_latency_ms']:.3f} ms "
            f"({stats['speedup']:.1f}x), {size}, built in {stats['build_seconds']:.1f} s")


def write_index(index, path) -> None:
    faiss = faiss_module()
    tmp = f"{path}.tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def read_index(path, stats: Optional[dict] = None):
    """A faiss index file with its tuned parameters; ValueError naming the file when it is damaged."""
    faiss = faiss_module()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing index file: {path}")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable faiss index (corrupt or truncated?): {first}") from None
    if stats is not None:
        if index.ntotal != stats["vectors"] or index.d != stats["dim"]:
            raise ValueError(f"{path} holds {index.ntotal} vectors of width {index.d}, index.json says "
                             f"{stats['vectors']} of width {stats['dim']}: the index folder is inconsistent")
        apply_params(index, stats)
    return index
