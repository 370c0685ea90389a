"""BYOL, SimSiam, VICReg, SwAV and PCL as objectives, single process, tiny towers: what they train, their
state, SwAV's prototypes and queue, multi-crop views, PCL's clustering against PCL's own formulas, the
collapse metrics, recipe validation, and feature-cache accumulation."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import assert_same_gradients
from test_noneg_parity import make  # the same tiny objectives as the parity tests

from mmcl.data_pipelines.stream import SampleSpec, ShardStream
from mmcl.data_pipelines.transforms import view_transform
from mmcl.config import ConfigError, load_recipe
from mmcl.losses.geometry import collapse_metrics, dimension_std, effective_rank
from mmcl.losses.pcl import proto_nce
from mmcl.models.multicrop import check_view_size, encode_any_size
from mmcl.objectives.clusters import ClusterState, cluster, concentration, key_ids, kmeans
from mmcl.trainer import step as T

CLOSE = dict(atol=1e-5, rtol=1e-5)
def batch(rows=6, seed=1, small=0):
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(rows, 3, 16, 16, generator=g) for _ in range(2)]
            + [torch.randn(rows, 3, 8, 8, generator=g) for _ in range(small)],
            "key": [f"{seed:03d}{i:03d}" for i in range(rows)]}


@pytest.mark.parametrize("name, heads", [("byol", ("head.", "predictor.")), ("simsiam", ("head.", "predictor.")),
                                         ("vicreg", ("head.",)), ("swav", ("head.", "prototypes."))])
def test_only_the_image_tower_and_heads_train(name, heads):
    objective = make(name)
    trained = {n for n, p in objective.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.visual.",) + heads) for n in trained)
    assert all(any(n.startswith(h) for n in trained) for h in heads)
    if name == "byol":  # the EMA target is state (in checkpoints), never trained
        state = objective.state_dict()
        assert any(k.startswith("target_visual.") for k in state) and any(k.startswith("target_head.") for k in state)
        assert not any(n.startswith("target_") for n in trained)


def test_byol_target_follows_the_cosine_momentum_schedule():
    objective = make("byol", byol={"momentum": 0.9})
    before = [p.clone() for p in objective.target_visual.parameters()]
    with torch.no_grad():
        for p in objective.model.visual.parameters():
            p.add_(1.0)
    objective.before_step(50, 100)  # halfway: m = 1 - 0.1 * (cos(pi / 2) + 1) / 2 = 0.95
    assert objective.log_values()["momentum"] == pytest.approx(0.95)
    for target, old, online in zip(objective.target_visual.parameters(), before, objective.model.visual.parameters()):
        torch.testing.assert_close(target, 0.95 * old + 0.05 * online)
    objective(batch())["loss"].backward()
    assert all(p.grad is None for p in objective.target_visual.parameters())


def test_simsiam_stops_the_gradient_through_its_targets():
    objective = make("simsiam")
    assert isinstance(objective.head[-1], torch.nn.BatchNorm1d) and not objective.head[-1].affine
    features = objective.encode(batch())
    z0 = features["z0"]
    loss = objective.losses(features)["loss"]
    (grad,) = torch.autograd.grad(loss, z0, retain_graph=True)
    p0 = objective.predictor(z0)  # the only path from z0 to the loss is through its own prediction
    expected = torch.autograd.grad(-0.5 * F.cosine_similarity(p0, features["z1"].detach()).mean(), z0)[0]
    torch.testing.assert_close(grad, expected, **CLOSE)


def test_vicreg_logs_its_three_terms():
    objective = make("vicreg", vicreg={"invariance_weight": 2.0, "variance_weight": 3.0, "covariance_weight": 4.0})
    out = objective(batch())
    expected = 2.0 * out["loss/invariance"] + 3.0 * out["loss/variance"] + 4.0 * out["loss/covariance"]
    torch.testing.assert_close(out["loss"].detach(), expected, **CLOSE)


def test_swav_prototypes_are_frozen_then_trained_and_kept_unit_length():
    objective = make("swav", swav={"prototypes": 8, "freeze_prototypes_steps": 2})
    for step in range(3):
        objective.before_step(step, 3)
        torch.testing.assert_close(objective.prototypes.layer.weight.norm(dim=1), torch.ones(8), **CLOSE)
        objective.zero_grad()
        objective(batch(seed=step))["loss"].backward()
        assert (objective.prototypes.layer.weight.grad is None) == (step < 2)
        assert objective.model.visual.conv1.weight.grad is not None
        with torch.no_grad():
            objective.prototypes.layer.weight.mul_(2.0)  # as an update would move them off the sphere


def test_swav_queue_fills_then_joins_the_codes_and_evaluation_leaves_it():
    objective = make("swav", swav={"prototypes": 8, "queue_size": 10, "queue_start": 1, "freeze_prototypes_steps": 0})
    seen = []
    for step in range(4):
        objective.before_step(step, 4)
        used = objective.queue_scores() is not None
        features = objective.encode(batch(seed=step))
        objective.losses(features)
        seen.append((used, int(objective.queue_count), int(objective.queue_ptr)))
    assert seen == [(False, 0, 0), (False, 6, 6), (False, 10, 2), (True, 10, 8)]
    torch.testing.assert_close(objective.queue[0, 2:8], features["z0"], **CLOSE)  # the newest rows, per crop
    torch.testing.assert_close(objective.queue[1, 2:8], features["z1"], **CLOSE)
    objective.eval()
    objective.losses(objective.encode(batch(seed=9)))
    assert int(objective.queue_ptr) == 8


def test_swav_small_views_run_through_the_vit_at_their_own_size():
    objective = make("swav", data={"small_views": 2, "small_view_size": 8}, swav={"prototypes": 8})
    features = objective.encode(batch(small=2))
    assert set(features) == {"z0", "z1", "z2", "z3"}
    objective.losses(features)["loss"].backward()
    assert objective.model.visual.positional_embedding.grad.abs().sum() > 0
    same = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(encode_any_size(objective.model.visual, same), objective.model.visual(same))
    with pytest.raises(ValueError, match=r"data.small_view_size: 12 px is not a multiple of the ViT's patch size 8"):
        check_view_size(objective.model.visual, 12)


def test_the_stream_yields_large_then_small_views(digits_root):
    from mmcl.data_pipelines import shards

    spec = SampleSpec(view_transform=view_transform(32), num_views=2, small_view_transform=view_transform(16),
                      num_small_views=3)
    out = next(iter(ShardStream(shards.expand_urls(digits_root, "train"), spec, batch_size=4, repeat=False,
                                shuffle_buffer=0)))
    assert [tuple(v.shape) for v in out["views"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3


# ---- PCL ----------------------------------------------------------------------------------------------

def test_proto_nce_is_pcls_formula():
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    centroids = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    phi = torch.rand(12, generator=g) + 0.1
    assign = torch.tensor([3, 3, 7, 0, 11])
    # PCL's code: logits of q against [its batch's positive prototypes, r other prototypes] / phi, target diag
    negatives = torch.tensor([i for i in range(12) if i not in {0, 3, 7, 11}])
    columns = torch.cat([assign, negatives])
    expected = F.cross_entropy(query @ centroids[columns].T / phi[columns], torch.arange(5))
    torch.testing.assert_close(proto_nce(query, centroids, phi, assign, negatives=100), expected, **CLOSE)
    sampled = proto_nce(query, centroids, phi, assign, negatives=3)  # r < others: 3 drawn at random
    assert torch.isfinite(sampled) and sampled < expected


def test_concentration_is_pcls_density():
    rng = np.random.default_rng(0)
    k, assignment = 6, np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 5, 5])  # cluster 4 empty, cluster 3 alone
    distance = rng.uniform(0.1, 1.0, len(assignment))
    reference = np.zeros(k)  # PCL's run_kmeans, transcribed
    clusters = [[] for _ in range(k)]
    for i, c in enumerate(assignment):
        clusters[c].append(distance[i] ** 2)
    for i, d in enumerate(clusters):
        if len(d) > 1:
            reference[i] = (np.asarray(d) ** 0.5).mean() / np.log(len(d) + 10)
    dmax = reference.max()
    for i, d in enumerate(clusters):
        if len(d) <= 1:
            reference[i] = dmax
    reference = reference.clip(np.percentile(reference, 10), np.percentile(reference, 90))
    reference = 0.2 * reference / reference.mean()
    np.testing.assert_allclose(concentration(distance, assignment, k, 10.0, 0.2), reference, rtol=1e-12)


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_kmeans_by_a_library_finds_separated_clusters(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1) * 3
    points = torch.cat([c + 0.05 * torch.randn(50, 16, generator=g) for c in centres])
    centroids, assignment, distance = kmeans(points.numpy(), 4, 20, 0, backend)
    assert centroids.shape == (4, 16) and len(set(assignment.tolist())) == 4
    for block in assignment.reshape(4, 50):  # each true cluster is one found cluster
        assert len(set(block.tolist())) == 1
    np.testing.assert_allclose(distance, np.linalg.norm(points.numpy() - centroids[assignment], axis=1), rtol=1e-4)
    result = cluster(F.normalize(points, dim=1), [4, 8], 20, 0, backend, 10.0, 0.2)
    assert [len(r["centroids"]) for r in result] == [4, 8]
    assert all(r["concentration"].mean().item() == pytest.approx(0.2) for r in result)


def test_cluster_state_finds_samples_by_key_and_checkpoints_with_the_data_shapes():
    keys = [f"{i:09d}" for i in range(7)]
    clusterings = [{"centroids": torch.eye(3), "concentration": torch.ones(3),
                    "assignment": torch.tensor([0, 1, 2, 0, 1, 2, 0])}]
    state = ClusterState(1)
    assert not state.ready
    state.set(key_ids(keys), clusterings)
    rows = state.rows(["000000004", "000000000"])
    assert state.clusterings(rows)[0]["assignments"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="sample key 'nope' was not in the clustering pass"):
        state.rows(["nope"])
    with pytest.raises(ValueError, match="PCL needs unique sample keys: 1 of 7"):
        ClusterState(1).set(key_ids(keys[:6] + keys[:1]), clusterings)
    empty = ClusterState(1)
    empty.load_state_dict(state.state_dict())  # the empty buffers take the saved shapes
    assert empty.ready and empty.rows(["000000006"]).tolist() == state.rows(["000000006"]).tolist()


def test_pcl_adds_proto_nce_once_clusters_exist():
    objective = make("pcl", moco={"queue_size": 16}, pcl={"num_clusters": [3, 4], "negatives": 100})
    data = batch()
    before = objective(data)
    assert before["loss/proto_nce"] == 0
    ids = key_ids(data["key"])
    objective.clusters.set(ids, cluster(torch.randn(6, 16), [3, 4], 10, 0, "sklearn", 10.0, 0.2))
    after = objective.losses(objective.encode(data))
    assert after["loss/proto_nce"] > 0
    expected = after["loss/moco_v2"].detach() + after["loss/proto_nce"]
    torch.testing.assert_close(after["loss"].detach(), expected, **CLOSE)


# ---- collapse metrics ----------------------------------------------------------------------------------

def test_collapse_metrics_tell_a_collapsed_batch_from_a_spread_one():
    spread = torch.randn(1024, 64, generator=torch.Generator().manual_seed(0))
    collapsed = torch.ones(256, 64) + 1e-6 * torch.randn(256, 64)
    assert float(dimension_std(spread)) == pytest.approx(1 / math.sqrt(64), rel=0.05)
    assert float(dimension_std(collapsed)) < 1e-5
    assert float(effective_rank(spread)) > 60 and float(effective_rank(collapsed)) < 1.1
    metrics = collapse_metrics(collapsed)
    assert metrics["uniformity"] > -1e-3 and collapse_metrics(spread)["uniformity"] < -3.5
    objective = make("byol")
    objective.watch(collapsed[:, :16])
    assert "collapsing" in objective.warning()
    objective.watch(spread[:, :16])
    assert objective.warning() is None and set(objective.log_values()) >= {"collapse/std", "collapse/effective_rank"}


# ---- recipes and accumulation --------------------------------------------------------------------------

def test_recipe_checks(tiny_recipe):
    path = str(tiny_recipe({"objective": {"name": "byol"}}))
    with pytest.raises(ConfigError, match=r"^objective.byol.predictor: its output \(32\) must be the projection's"):
        load_recipe(path, ["objective.byol.predictor=[64,32]", "model.ssl_head=[64,16]"])
    with pytest.raises(ConfigError, match=r"^data.small_views: only objective swav uses small"):
        load_recipe(path, ["data.small_views=2"])
    with pytest.raises(ConfigError, match=r"^objective.swav: options of objective swav, but objective.name is byol"):
        load_recipe(path, ["objective.swav.prototypes=10"])
    with pytest.raises(ConfigError, match=r"^objective.pcl.num_clusters: 5000 clusters for 4000 training samples"):
        load_recipe(path, ["objective.name=pcl", "objective.pcl.num_clusters=[10,5000]"])
    with pytest.raises(ConfigError, match=r"^objective.moco.version: PCL adds ProtoNCE to MoCo v2"):
        load_recipe(path, ["objective.name=pcl", "objective.pcl.num_clusters=[10]", "objective.moco.version=3"])
    with pytest.raises(ConfigError, match=r"^objective.vicreg.eps: must be > 0"):
        load_recipe(path, ["objective.name=vicreg", "objective.vicreg.eps=0"])
    assert load_recipe(path, ["objective.name=swav"]).objective.section("swav").prototypes == 3000


@pytest.mark.parametrize("name, options, small", [
    ("byol", {}, 0), ("simsiam", {}, 0), ("vicreg", {}, 0),
    ("swav", {"swav": {"prototypes": 8, "queue_size": 16, "freeze_prototypes_steps": 0}}, 2),
    ("pcl", {"moco": {"queue_size": 16}, "pcl": {"num_clusters": [3]}}, 0)])
def test_feature_cache_accumulation_equals_plain_backward(name, options, small):
    """Heads without BatchNorm (one layer): BN statistics of a micro-batch differ from the whole batch's."""
    head = (16, 16) if name == "simsiam" else (16,)  # SimSiam's projector ends in BN; its statistics differ
    plain = make(name, ssl_head=head, data={"small_views": small, "small_view_size": 8}, **options)
    if name == "simsiam":
        plain.head[-1].eval(), plain.predictor.eval()
        for module in plain.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.eval()
    data = batch(rows=8, small=small)
    if name == "pcl":
        plain.clusters.set(key_ids(data["key"]), cluster(torch.randn(8, 16), [3], 10, 0, "sklearn", 10.0, 0.2))
    cached = copy.deepcopy(plain)
    plain.before_step(0, 1), cached.before_step(0, 1)
    accelerator = Accelerator(cpu=True)
    expected = T.plain_backward(plain, data, accelerator)
    got = T.cached_backward(cached, T.split_batch(data, 2), accelerator)
    torch.testing.assert_close(got["loss"], expected["loss"], **CLOSE)
    assert_same_gradients(plain, cached, **CLOSE)
