"""Child of benchmarks/ann_index.py, run by the autofaiss environment's Python (benchmarks/.autofaiss_env):
autofaiss's own index for a memory budget, built from a .npy of normalised vectors, written to disk.

    python autofaiss_build.py VECTORS.npy BUDGET OUT.faiss OUT.json
"""
import json
import sys
import time

import numpy as np
from autofaiss import build_index


def main(vectors_path: str, budget: str, index_path: str, info_path: str) -> None:
    vectors = np.load(vectors_path)
    start = time.perf_counter()
    _, infos = build_index(embeddings=vectors, index_path=index_path, index_infos_path=info_path + ".autofaiss",
                           max_index_memory_usage=budget, current_memory_available="16G", metric_type="ip",
                           save_on_disk=True, verbose=30)
    seconds = time.perf_counter() - start
    with open(info_path, "w") as f:
        json.dump({"seconds": seconds, "index_key": infos.get("index_key"), "index_param": infos.get("index_param"),
                   "autofaiss_infos": {k: v for k, v in infos.items() if isinstance(v, (int, float, str))}}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
