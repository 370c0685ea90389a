"""PCL (Li, Zhou, Xiong, Hoi 2021): ProtoNCE over k-means prototypes, added to MoCo v2's InfoNCE.

The InfoNCE half is mmcl's MoCo v2 (`objective.moco`: queue, momentum, temperature). For the first
`objective.pcl.warmup_epochs` epochs that is all. From then on, at the start of every epoch the momentum
encoder (tower + head, eval mode) embeds the whole training set without augmentation, k-means clusters the
normalised features once per k in `num_clusters` (scikit-learn or faiss; see `mmcl.objectives.clusters`),
and each query of the epoch is also scored against the prototypes (`mmcl.losses.pcl.proto_nce_mean`, with
each prototype's concentration as its temperature). The loss is InfoNCE + ProtoNCE, both symmetrised over
the two views. The clusterings are buffers, so a run resumed inside an epoch uses the clusters of that
epoch's start.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

from mmcl.data_pipelines.stream import SampleSpec, ShardStream, make_loader
from mmcl.config import Recipe
from mmcl.distributed import get_rank, get_world_size, is_distributed
from mmcl.losses.infonce import l2_normalize
from mmcl.losses.pcl import proto_nce_mean
from mmcl.models import eval_preprocess
from mmcl.objectives.base import Features
from mmcl.objectives.clusters import ClusterState, cluster, key_ids
from mmcl.objectives.moco import MoCoObjective


class PCLObjective(MoCoObjective):
    """MoCo v2 + ProtoNCE; options in `objective.pcl` and `objective.moco` (version 2)."""

    def __init__(self, model: nn.Module, recipe: Recipe):
        super().__init__(model, recipe)
        self.options = recipe.objective.section("pcl")
        self.temperature = recipe.objective.section("moco").temperature
        self.clusters = ClusterState(len(self.options.num_clusters))
        self.seed, self.batch_size = recipe.train.seed, recipe.eval.batch_size
        self.workers, self.max_pixels = recipe.data.workers, recipe.data.max_pixels

    def encode(self, batch: dict) -> Features:
        features = super().encode(batch)
        if self.clusters.ready:
            features["cluster_rows"] = self.clusters.rows(batch["key"])
        return features

    def losses(self, features: Features) -> Dict[str, torch.Tensor]:
        out = super().losses(features)
        proto = out["loss"].new_zeros(())
        if "cluster_rows" in features:
            clusterings = self.clusters.clusterings(features["cluster_rows"])
            r = self.options.negatives
            proto = 0.5 * (proto_nce_mean(features["q0"], clusterings, r)
                           + proto_nce_mean(features["q1"], clusterings, r))
        return {"loss": out["loss"] + proto, "loss/moco_v2": out["loss"], "loss/proto_nce": proto.detach()}

    def before_epoch(self, epoch: int, urls: List[str]) -> None:
        """Cluster the momentum encoder's features of the training set (from the end of the warm-up on)."""
        if epoch < self.options.warmup_epochs:
            return
        keys, features = self.embed(urls)
        result = None
        if get_rank() == 0:
            o = self.options
            result = cluster(features, o.num_clusters, o.kmeans_iters, self.seed + 1000 * epoch, o.kmeans, o.alpha,
                             self.temperature)
        if is_distributed():
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        self.clusters.set(key_ids(keys), result)

    @torch.no_grad()
    def embed(self, urls: List[str]) -> Tuple[List[str], torch.Tensor]:
        """(keys, normalised momentum-encoder features) of every training sample, gathered from all processes."""
        device = next(self.parameters()).device
        spec = SampleSpec(image_transform=eval_preprocess(self.model), max_pixels=self.max_pixels)
        stream = ShardStream(urls, spec, self.batch_size, repeat=False, partial=True, shuffle_buffer=0)
        workers = min(self.workers, len(urls) // get_world_size())
        keys, chunks, was_training = [], [], self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for batch in make_loader(stream, workers):
                    keys += batch["key"]
                    chunks.append(l2_normalize(self.key(batch["image"].to(device))).float().cpu())
        finally:
            self.train(was_training)
        features = torch.cat(chunks)
        if is_distributed():
            parts = [None] * get_world_size()
            dist.all_gather_object(parts, (keys, features.numpy()))
            keys = [k for part in parts for k in part[0]]
            features = torch.cat([torch.from_numpy(part[1]) for part in parts])
        return keys, features
