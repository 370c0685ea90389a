"""PCL's clustering of the training set: k-means by a library, concentrations, and the state that keeps them.

At the start of an epoch the momentum encoder embeds every training image once (eval preprocessing, no
augmentation); each process embeds its share of the shards and all of them are gathered. k-means with
scikit-learn (`KMeans`) or faiss (`faiss.Kmeans`, the library PCL uses) runs once per k on the main
process and the result is broadcast. Per cluster the concentration is PCL's

    phi = mean_z ||v_z - c|| / log(Z + alpha)

(Z points in the cluster; clusters of one point or none get the largest phi), clipped to its 10th-90th
percentiles and scaled to mean `temperature`. Samples are found again by their webdataset key, so keys must
be unique across the training set; a 63-bit hash of each key is stored, sorted, in the checkpoints.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn


def key_ids(keys: Sequence[str]) -> torch.Tensor:
    """A stable 63-bit id per sample key (blake2b), as int64."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") >> 1
                         for k in keys], dtype=torch.long)


def kmeans(features: np.ndarray, k: int, iters: int, seed: int,
           backend: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids (k, d), assignment (N,), distance of each point to its centroid (N,)) by a library."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if backend == "faiss":
        import faiss

        km = faiss.Kmeans(features.shape[1], k, niter=iters, seed=seed, verbose=False)
        km.train(features)
        squared, assignment = km.index.search(features, 1)
        return km.centroids, assignment[:, 0].astype(np.int64), np.sqrt(np.maximum(squared[:, 0], 0))
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit(features)
    centroids, assignment = km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64)
    return centroids, assignment, np.linalg.norm(features - centroids[assignment], axis=1)


def concentration(distance: np.ndarray, assignment: np.ndarray, k: int, alpha: float,
                  temperature: float) -> np.ndarray:
    """PCL's per-cluster concentration phi (see the module docstring), shape (k,)."""
    counts = np.bincount(assignment, minlength=k)
    sums = np.bincount(assignment, weights=distance, minlength=k)
    phi = np.zeros(k)
    big = counts > 1
    phi[big] = sums[big] / counts[big] / np.log(counts[big] + alpha)
    phi[~big] = phi.max() if big.any() else 1.0
    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))
    return temperature * phi / phi.mean()


def cluster(features: torch.Tensor, ks: Sequence[int], iters: int, seed: int, backend: str, alpha: float,
            temperature: float) -> List[Dict[str, torch.Tensor]]:
    """One clustering per k of normalised features (N, d): centroids (normalised), concentration, assignment."""
    x = features.float().numpy()
    out = []
    for i, k in enumerate(ks):
        if k > len(x):
            raise ValueError(f"objective.pcl.num_clusters: {k} clusters for {len(x)} training samples")
        centroids, assignment, distance = kmeans(x, k, iters, seed + i, backend)
        out.append({"centroids": nn.functional.normalize(torch.from_numpy(centroids).float(), dim=1),
                    "concentration": torch.from_numpy(concentration(distance, assignment, k, alpha,
                                                                    temperature)).float(),
                    "assignment": torch.from_numpy(assignment)})
    return out


class ClusterState(nn.Module):
    """The current clusterings as buffers (so checkpoints carry them): sorted key ids and, per k, centroids,
    concentrations and the assignment of every key. Shapes follow the data; loading resizes them."""

    def __init__(self, count: int):
        super().__init__()
        self.count = count
        self.register_buffer("key_ids", torch.zeros(0, dtype=torch.long))
        for i in range(count):
            self.register_buffer(f"centroids_{i}", torch.zeros(0, 0))
            self.register_buffer(f"concentration_{i}", torch.zeros(0))
            self.register_buffer(f"assignment_{i}", torch.zeros(0, dtype=torch.long))

    @property
    def ready(self) -> bool:
        return self.key_ids.numel() > 0

    def set(self, ids: torch.Tensor, clusterings: List[Dict[str, torch.Tensor]]) -> None:
        """Store clusterings of the samples with these key ids (in the same order)."""
        if len(torch.unique(ids)) != len(ids):
            raise ValueError(f"PCL needs unique sample keys: {len(ids) - len(torch.unique(ids))} of {len(ids)} "
                             f"training samples share a key (write the shards with distinct keys)")
        order = torch.argsort(ids)
        device = self.key_ids.device
        self.key_ids = ids[order].to(device)
        for i, result in enumerate(clusterings):
            setattr(self, f"centroids_{i}", result["centroids"].to(device))
            setattr(self, f"concentration_{i}", result["concentration"].to(device))
            setattr(self, f"assignment_{i}", result["assignment"][order].to(device))

    def rows(self, keys: Sequence[str]) -> torch.Tensor:
        """Each key's row in the clustered set; an unknown key is an error."""
        ids = key_ids(keys).to(self.key_ids.device)
        rows = torch.searchsorted(self.key_ids, ids).clamp_max(len(self.key_ids) - 1)
        missing = (self.key_ids[rows] != ids).nonzero()
        if len(missing):
            raise ValueError(f"sample key {keys[int(missing[0])]!r} was not in the clustering pass over the "
                             f"training set")
        return rows

    def clusterings(self, rows: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """Per k: centroids, concentrations and the clusters of these rows (what `proto_nce_mean` takes)."""
        return [{"centroids": getattr(self, f"centroids_{i}"), "concentration": getattr(self, f"concentration_{i}"),
                 "assignments": getattr(self, f"assignment_{i}")[rows]} for i in range(self.count)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buffer in self._buffers.items():  # the saved clusterings' shapes, not the empty ones
            saved = state_dict.get(prefix + name)
            if saved is not None and buffer is not None and saved.shape != buffer.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buffer.dtype, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
