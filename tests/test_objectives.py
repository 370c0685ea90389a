"""SimCLR, MoCo v2/v3, SLIP and CLIP with cross-modal queues on a tiny open_clip model, single process.

Covers: which parameters train, parity of the SimCLR objective with lightly's NTXentLoss (with and without
memory bank), the EMA update and its cosine schedule, the MoCo and cross-modal queues against explicit
formulas, SLIP's weighted sum, and feature-cache accumulation giving the plain backward's gradients.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import assert_same_gradients
from lightly.loss import NTXentLoss as LightlyNTXentLoss

from mmcl.config import ConfigError, ModelConfig, ObjectiveConfig, Recipe, prepare_objective
from mmcl.objective_options import SECTION_TYPES
from mmcl.losses import ClipLoss, NTXentLoss
from mmcl.models import build_model
from mmcl.objectives import REGISTRY, build_objective
from mmcl.objectives.simclr import SimCLRObjective
from mmcl.trainer import step as T
from mmcl.trainer.optim import make_optimizer

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
CLOSE = dict(atol=1e-5, rtol=1e-5)


def tiny_recipe(name: str, ssl_head=(32, 16), **sections) -> Recipe:
    """A recipe for objective `name`; `sections` are option sections, e.g. moco={"queue_size": 10}."""
    options = {section: SECTION_TYPES[section](**values) for section, values in sections.items()}
    return Recipe(model=ModelConfig(config=TINY, ssl_head=list(ssl_head)),
                  objective=ObjectiveConfig(name=name, **options))


def make(name: str, ssl_head=(32, 16), **sections):
    torch.manual_seed(0)
    recipe = tiny_recipe(name, ssl_head, **sections)
    model, _ = build_model(recipe.model)
    return build_objective(recipe, model)


def make_batch(rows: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(rows, 3, 16, 16, generator=g) for _ in range(2)],
            "image": torch.randn(rows, 3, 16, 16, generator=g),
            "text": torch.randint(1, 64, (rows, 8), generator=g)}


def trainable_names(objective) -> set:
    return {name for name, p in objective.named_parameters() if p.requires_grad}


def test_registry_and_data_flags():
    assert {"simclr", "moco", "slip"} <= set(REGISTRY)
    flags = {name: (o.uses_text, o.uses_image, o.uses_views)
             for name, o in (("simclr", make("simclr")), ("moco", make("moco")), ("slip", make("slip")),
                             ("xqueue", make("clip", clip={"cross_modal_queue": 8})))}
    assert flags == {"simclr": (False, False, True), "moco": (False, False, True), "slip": (True, True, True),
                     "xqueue": (True, True, False)}


@pytest.mark.parametrize("version", [2, 3])
def test_image_only_objectives_train_the_image_tower_and_heads_only(version):
    simclr, moco = make("simclr"), make("moco", moco={"version": version})
    for objective, heads in ((simclr, ("head.",)), (moco, ("head.", "predictor."))):
        names = trainable_names(objective)
        assert names and all(n.startswith(("model.visual.",) + heads) for n in names)
        assert any(n.startswith("model.visual.") for n in names)
        assert not any(n.startswith("key_") for n in names)  # momentum copies never reach the optimizer
        groups = make_optimizer(objective, tiny_recipe("simclr").optim).param_groups
        assert sum(len(g["params"]) for g in groups) == len(names)
    assert any(n.startswith("predictor.") for n in trainable_names(moco)) == (version == 3)


def test_simclr_objective_matches_lightly_ntxent():
    objective = make("simclr", simclr={"temperature": 0.3})
    features = objective.encode(make_batch())
    ours = objective.losses(features)
    reference = LightlyNTXentLoss(temperature=0.3)(features["z0"], features["z1"])
    torch.testing.assert_close(ours["loss"], reference, **CLOSE)
    assert set(ours) == {"loss", "loss/simclr"}
    params = [p for p in objective.parameters() if p.requires_grad]
    ours_grad = torch.autograd.grad(ours["loss"], params, retain_graph=True)
    reference_grad = torch.autograd.grad(reference, params)
    for a, b in zip(ours_grad, reference_grad):
        torch.testing.assert_close(a, b, **CLOSE)


def test_simclr_objective_with_memory_bank_matches_lightly_over_steps():
    torch.manual_seed(0)
    recipe = tiny_recipe("simclr", simclr={"temperature": 0.2})
    objective = SimCLRObjective(build_model(recipe.model)[0], recipe, memory_bank_size=12)
    reference = LightlyNTXentLoss(temperature=0.2, memory_bank_size=(12, 16))
    objective.loss_fn.queue.copy_(reference.memory_bank.bank)
    # 4 steps of 4 rows through a bank of 12: wraps around once (lightly drops rows that do not fit at the
    # end of its bank, mmcl wraps them to the start, so the bank size is a multiple of the batch here).
    for step in range(4):
        features = objective.encode(make_batch(rows=4, seed=step))
        expected = reference(features["z0"], features["z1"])
        torch.testing.assert_close(objective.losses(features)["loss"], expected, **CLOSE)
        torch.testing.assert_close(objective.loss_fn.queue, reference.memory_bank.bank, **CLOSE)
    assert int(objective.loss_fn.queue_ptr) == int(reference.memory_bank.bank_ptr) == 4


def test_moco_ema_update_follows_the_formula():
    objective = make("moco", moco={"momentum": 0.9})
    key_before = [p.clone() for p in objective.key_visual.parameters()]
    with torch.no_grad():  # the query encoder moved (as after an optimizer step)
        for p in objective.model.visual.parameters():
            p.add_(torch.randn_like(p))
        objective.head[1].running_mean.fill_(0.5)
    objective.before_step(0, 10)
    for key, old, query in zip(objective.key_visual.parameters(), key_before, objective.model.visual.parameters()):
        torch.testing.assert_close(key, 0.9 * old + 0.1 * query)
    assert torch.equal(objective.key_head[1].running_mean, objective.head[1].running_mean)  # BN stats copied


def test_moco_cosine_momentum_schedule():
    objective = make("moco", moco={"momentum": 0.99, "momentum_cosine": True})
    seen = []
    for step in (0, 50, 100):
        objective.before_step(step, 100)
        seen.append(objective.log_values()["momentum"])
    assert seen == pytest.approx([0.99, 0.995, 1.0])
    frozen = [p.clone() for p in objective.key_visual.parameters()]
    with torch.no_grad():
        for p in objective.model.visual.parameters():
            p.add_(1.0)
    objective.before_step(100, 100)  # momentum 1: the key encoder no longer moves
    for key, old in zip(objective.key_visual.parameters(), frozen):
        torch.testing.assert_close(key, old)


def test_moco_v2_loss_and_queue():
    objective = make("moco", moco={"temperature": 0.2, "queue_size": 10})
    features = objective.encode(make_batch())
    queue = objective.loss_fn.queue.clone()
    q0, q1, k0, k1 = (F.normalize(features[n], dim=1) for n in ("q0", "q1", "k0", "k1"))

    def moco(q, k):  # [positive, queue] / T, target column 0
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    losses = objective.losses(features)
    torch.testing.assert_close(losses["loss"], 0.5 * (moco(q0, k1) + moco(q1, k0)), **CLOSE)
    assert set(losses) == {"loss", "loss/moco_v2"}
    torch.testing.assert_close(objective.loss_fn.queue[:6], k0, **CLOSE)  # one view's keys, once per step
    torch.testing.assert_close(objective.loss_fn.queue[6:], queue[6:])
    assert int(objective.loss_fn.queue_ptr) == 6
    objective.eval()
    objective.losses(objective.encode(make_batch(seed=2)))
    assert int(objective.loss_fn.queue_ptr) == 6  # evaluation leaves the queue alone


def test_moco_v3_loss_predictor_and_no_queue():
    objective = make("moco", moco={"version": 3, "temperature": 0.2})
    assert isinstance(objective.head[-1], torch.nn.BatchNorm1d) and not objective.head[-1].affine
    assert not any("queue" in name for name in objective.state_dict())
    features = objective.encode(make_batch())
    q0, q1, k0, k1 = (F.normalize(features[n], dim=1) for n in ("q0", "q1", "k0", "k1"))
    labels = torch.arange(6)
    expected = 2 * 0.2 * (F.cross_entropy(q0 @ k1.T / 0.2, labels) + F.cross_entropy(q1 @ k0.T / 0.2, labels))
    torch.testing.assert_close(objective.losses(features)["loss"], expected, **CLOSE)


def test_moco_gradients_reach_queries_not_keys():
    objective = make("moco")
    objective(make_batch())["loss"].backward()
    assert all(p.grad is None for p in objective.key_visual.parameters())
    assert all(p.grad is None for p in objective.model.transformer.parameters())  # frozen text tower
    assert objective.model.visual.conv1.weight.grad.abs().sum() > 0


def test_slip_is_the_weighted_sum_of_clip_and_simclr():
    objective = make("slip", slip={"clip_weight": 0.7, "ssl_weight": 0.4}, simclr={"temperature": 0.1})
    features = objective.encode(make_batch())
    losses = objective.losses(features)
    clip = ClipLoss()(features["image"], features["text"], objective.model.logit_scale.exp())
    ssl = NTXentLoss(0.1)(features["z0"], features["z1"])
    torch.testing.assert_close(losses["loss/clip"], clip, **CLOSE)
    torch.testing.assert_close(losses["loss/simclr"], ssl, **CLOSE)
    torch.testing.assert_close(losses["loss"], 0.7 * clip + 0.4 * ssl, **CLOSE)
    losses["loss"].backward()
    for module in (objective.model.visual, objective.model.transformer, objective.head):
        assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_cross_modal_queue_matches_explicit_formula_and_enqueues():
    objective = make("clip", clip={"cross_modal_queue": 10})
    features = objective.encode(make_batch())
    image_queue, text_queue = objective.image_queue.clone(), objective.text_queue.clone()
    image, text = F.normalize(features["image"], dim=1), F.normalize(features["text"], dim=1)
    key_image, key_text = features["key_image"], features["key_text"]
    scale, labels = objective.model.logit_scale.exp(), torch.arange(6)
    expected = 0.5 * (F.cross_entropy(scale * image @ torch.cat([key_text, text_queue]).T, labels)
                      + F.cross_entropy(scale * text @ torch.cat([key_image, image_queue]).T, labels))
    torch.testing.assert_close(objective.losses(features)["loss"], expected, **CLOSE)
    torch.testing.assert_close(objective.image_queue[:6], key_image, **CLOSE)
    torch.testing.assert_close(objective.text_queue[:6], key_text, **CLOSE)
    assert int(objective.image_queue_ptr) == int(objective.text_queue_ptr) == 6
    assert {"image_queue", "text_queue", "image_queue_ptr", "text_queue_ptr"} <= set(objective.state_dict())
    assert not any(n.startswith("key_model.") for n in trainable_names(objective))


def test_cross_modal_queue_is_a_clip_option_only():
    with pytest.raises(ConfigError, match="objective.clip: options of objective clip, but objective.name is simclr"):
        prepare_objective({"objective": {"name": "simclr", "clip": {"cross_modal_queue": 8}}}, overriding=True)


# Feature-cache accumulation: heads without BatchNorm (ssl_head of one layer), since BN statistics over a
# micro-batch differ from those over the whole batch by construction.
@pytest.mark.parametrize("name,options", [("simclr", {}), ("moco", {"moco": {"queue_size": 16}}), ("slip", {}),
                                          ("clip", {"clip": {"cross_modal_queue": 16}})])
def test_feature_cache_accumulation_equals_plain_backward(name, options):
    plain = make(name, ssl_head=(16,), **options)
    cached = copy.deepcopy(plain)
    accelerator = Accelerator(cpu=True)
    batch = make_batch(rows=8)
    plain_losses = T.plain_backward(plain, batch, accelerator)
    cached_losses = T.cached_backward(cached, T.split_batch(batch, 2), accelerator)
    torch.testing.assert_close(cached_losses["loss"], plain_losses["loss"], **CLOSE)
    assert_same_gradients(plain, cached, **CLOSE)
    for (key, a), b in zip(plain.named_buffers(), cached.buffers()):
        if "queue" in key:
            torch.testing.assert_close(b, a, **CLOSE, msg=key)


def test_temperature_default_and_key_features():
    objective = make("simclr")
    assert objective.loss_fn.temperature == 0.1
    assert objective.key_features() == ("z0", "z1")
    assert make("moco").key_features() == ("q0", "q1", "k0", "k1")
    assert math.isclose(make("moco").log_values()["momentum"], 0.99)
