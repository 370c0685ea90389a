"""Parity with lightly 1.6.0 for the objectives without negatives and with prototypes, single process.

Values and gradients to 1e-5 on the same inputs: NegativeCosineSimilarity (BYOL, SimSiam), VICRegLoss,
sinkhorn and SwaVLoss (same Sinkhorn settings, with a queue and small crops), lightly's heads (BYOL,
SimSiam, SwAV, VICReg) with mmcl's weights copied in, its momentum update and cosine schedule, and whole
BYOL / SimSiam / VICReg / SwAV objectives against lightly's modules driven the way lightly's examples do.
"""
import copy

import pytest
import torch
from lightly.loss import NegativeCosineSimilarity as LightlyNegCos
from lightly.loss import SwaVLoss as LightlySwaVLoss
from lightly.loss import VICRegLoss as LightlyVICRegLoss
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn
from lightly.models import utils as lightly_utils
from lightly.models.modules import heads as lightly_heads
from lightly.utils.scheduler import cosine_schedule

from mmcl.config import ModelConfig, ObjectiveConfig, Recipe
from mmcl.losses.byol import NegativeCosineSimilarity
from mmcl.losses.swav import SwaVLoss, sinkhorn
from mmcl.losses.vicreg import VICRegLoss
from mmcl.models import ProjectionHead, build_model, cosine_momentum, ema_update
from mmcl.models.heads import Prototypes
from mmcl.objective_options import SECTION_TYPES
from mmcl.objectives import build_objective

CLOSE = dict(atol=1e-5, rtol=1e-5)
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def leaf(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def assert_close_to_scale(ours, theirs, msg=""):
    """Equal to 5e-5 of the tensor's scale: float32 sums over many large terms (VICReg's weights of 25 make
    gradients of ~50) differ in the last bits, which an elementwise tolerance would count against small entries.
    How many bits depends on the CPU's matrix kernels: under 1e-5 of scale on an AMX Xeon, 1.4e-5 on an
    AVX2 AMD EPYC (VICReg, step 2); a wrong gradient is off by far more."""
    scale = max(1.0, float(theirs.abs().max()))
    assert float((ours - theirs).abs().max()) <= 5e-5 * scale, f"{msg}: max diff {(ours - theirs).abs().max():.3e}"


def assert_same_value_and_grads(ours, theirs, inputs):
    torch.testing.assert_close(ours.reshape(()), theirs.reshape(()), **CLOSE)
    for a, b in zip(torch.autograd.grad(ours, inputs, retain_graph=True), torch.autograd.grad(theirs.sum(), inputs)):
        torch.testing.assert_close(a, b, **CLOSE)


def test_negative_cosine_similarity_matches_lightly():
    x0, x1 = leaf(7, 12, seed=1), leaf(7, 12, seed=2)
    assert_same_value_and_grads(NegativeCosineSimilarity()(x0, x1), LightlyNegCos()(x0, x1), [x0, x1])


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (5.0, 10.0, 0.5)])
def test_vicreg_loss_matches_lightly(weights):
    z_a, z_b = leaf(9, 24, seed=3), leaf(9, 24, seed=4)
    ours = VICRegLoss(*weights, gather_distributed=False)(z_a, z_b)
    assert_same_value_and_grads(ours, LightlyVICRegLoss(*weights)(z_a, z_b), [z_a, z_b])


@pytest.mark.parametrize("iterations, epsilon", [(3, 0.05), (10, 0.03)])
def test_sinkhorn_matches_lightly_and_equipartitions(iterations, epsilon):
    features, prototypes = leaf(40, 8, seed=7).detach(), leaf(5, 8, seed=8).detach()
    scores = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(prototypes, dim=1).T
    codes = sinkhorn(scores, iterations, epsilon)
    torch.testing.assert_close(codes, lightly_sinkhorn(scores, iterations, epsilon), **CLOSE)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(40), **CLOSE)  # each sample a distribution

    def spread(assignments):  # how unevenly the prototypes share the batch
        return float(assignments.sum(dim=0).std() / assignments.sum(dim=0).mean())

    assert spread(codes) < 0.6 * spread(torch.softmax(scores / epsilon, dim=1))  # towards an equipartition


@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_matches_lightly_with_small_crops(with_queue):
    high = [leaf(6, 10, seed=i) for i in range(2)]
    low = [leaf(6, 10, seed=10 + i) for i in range(3)]
    queue = [leaf(12, 10, seed=20 + i).detach() for i in range(2)] if with_queue else None
    settings = dict(temperature=0.2, sinkhorn_iterations=4, sinkhorn_epsilon=0.04)
    ours = SwaVLoss(**settings)(high, low, queue)
    theirs = LightlySwaVLoss(**settings)(high, low, queue)
    assert_same_value_and_grads(ours, theirs, high + low)


def copy_head(ours: ProjectionHead, theirs: torch.nn.Module) -> torch.nn.Module:
    """lightly's head with mmcl's weights: the same layers in the same order (lightly nests them in .layers)."""
    theirs.layers.load_state_dict(ours.state_dict())
    return theirs


HEADS = {  # lightly head -> (mmcl sizes, last_bn)
    "BYOLProjectionHead": (lambda: lightly_heads.BYOLProjectionHead(24, 40, 12), [40, 12], False),
    "BYOLPredictionHead": (lambda: lightly_heads.BYOLPredictionHead(24, 40, 12), [40, 12], False),
    "SimSiamProjectionHead": (lambda: lightly_heads.SimSiamProjectionHead(24, 40, 12), [40, 40, 12], True),
    "SimSiamPredictionHead": (lambda: lightly_heads.SimSiamPredictionHead(24, 6, 12), [6, 12], False),
    "SwaVProjectionHead": (lambda: lightly_heads.SwaVProjectionHead(24, 40, 12), [40, 12], False),
    "VICRegProjectionHead": (lambda: lightly_heads.VICRegProjectionHead(24, 40, 12, num_layers=3), [40, 40, 12],
                             False),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_match_lightly_heads(name):
    build, sizes, last_bn = HEADS[name]
    torch.manual_seed(0)
    ours = ProjectionHead(24, sizes, last_bn=last_bn)
    theirs = copy_head(ours, build())
    x = leaf(10, 24, seed=5)
    for mode in (True, False):
        ours.train(mode), theirs.train(mode)
        assert_same_value_and_grads(ours(x).square().sum(), theirs(x).square().sum(), [x])


def test_prototypes_match_lightly_swav_prototypes_without_bias():
    ours = Prototypes(12, 7)
    theirs = lightly_heads.SwaVPrototypes(12, 7)
    with torch.no_grad():
        theirs.heads[0].weight.copy_(ours.layer.weight * 3.0)
        theirs.heads[0].bias.zero_()  # SwAV's prototypes have no bias; lightly's Linear has one
        ours.layer.weight.mul_(3.0)
    ours.normalize_(), theirs.normalize()
    torch.testing.assert_close(ours.layer.weight, theirs.heads[0].weight, **CLOSE)
    torch.testing.assert_close(ours.layer.weight.norm(dim=1), torch.ones(7), **CLOSE)
    x = leaf(5, 12, seed=6)
    assert_same_value_and_grads(ours(x).sum(), theirs(x).sum(), [x])


def test_momentum_update_and_cosine_schedule_match_lightly():
    torch.manual_seed(0)
    online, target = ProjectionHead(8, [16, 4]), ProjectionHead(8, [16, 4])
    reference = copy.deepcopy(target)
    ema_update(target, online, 0.9)
    lightly_utils.update_momentum(online, reference, 0.9)
    for a, b in zip(target.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, **CLOSE)
    for step in range(0, 101, 7):  # lightly's schedule over max_steps = total + 1 is BYOL's over total
        assert cosine_momentum(0.99, step, 100) == pytest.approx(cosine_schedule(step, 101, 0.99, 1.0), abs=1e-12)


# ---- whole objectives against lightly's modules, driven the way lightly's examples drive them ----------

def make(name: str, ssl_head=(32, 16), data=None, **sections):
    torch.manual_seed(0)
    options = {s: SECTION_TYPES[s](**v) for s, v in sections.items()}
    recipe = Recipe(model=ModelConfig(config=TINY, ssl_head=list(ssl_head)),
                    objective=ObjectiveConfig(name=name, **options))
    for key, value in (data or {}).items():
        setattr(recipe.data, key, value)
    return build_objective(recipe, build_model(recipe.model)[0])


def views(count=2, rows=6, seed=1, small=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(rows, 3, 16, 16, generator=g) for _ in range(count)]
            + [torch.randn(rows, 3, 8, 8, generator=g) for _ in range(small)])


def sgd_(params, lr=0.02):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None


def lockstep(objective, reference, reference_params, steps=3, **batch_options):
    """Train both with SGD on the same batches; their losses and gradients agree at every step."""
    objective.train(), reference.train()
    for step in range(steps):
        batch = views(seed=step, **batch_options)
        objective.before_step(step, steps)
        ours = objective({"views": batch})["loss"]
        theirs = reference.step(batch, step, steps)
        torch.testing.assert_close(ours, theirs.reshape(()), **CLOSE, msg=f"loss at step {step}")
        ours.backward(), theirs.sum().backward()
        mine = [p for p in objective.parameters() if p.requires_grad]
        for (name, a), b in zip([(n, p) for n, p in objective.named_parameters() if p.requires_grad],
                                reference_params()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                assert_close_to_scale(a.grad, b.grad, f"{name} at step {step}")
        sgd_(mine), sgd_(reference_params())


class LightlyBYOL(torch.nn.Module):
    """lightly's BYOL example: backbone, BYOL heads, deepcopied momentum copies, update_momentum with
    cosine_schedule, 0.5 * (criterion(p0, z1) + criterion(p1, z0))."""

    def __init__(self, objective, m0):
        super().__init__()
        self.backbone = copy.deepcopy(objective.model.visual)
        self.projection_head = copy_head(objective.head, lightly_heads.BYOLProjectionHead(16, 32, 8))
        self.prediction_head = copy_head(objective.predictor, lightly_heads.BYOLPredictionHead(8, 32, 8))
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        lightly_utils.deactivate_requires_grad(self.backbone_momentum)
        lightly_utils.deactivate_requires_grad(self.projection_head_momentum)
        self.criterion, self.m0 = LightlyNegCos(), m0

    def step(self, batch, step, steps):
        m = cosine_schedule(step, steps + 1, self.m0, 1.0)
        lightly_utils.update_momentum(self.backbone, self.backbone_momentum, m)
        lightly_utils.update_momentum(self.projection_head, self.projection_head_momentum, m)
        p0, p1 = (self.prediction_head(self.projection_head(self.backbone(x))) for x in batch[:2])
        z0, z1 = (self.projection_head_momentum(self.backbone_momentum(x)).detach() for x in batch[:2])
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def trained(self):
        return [*self.backbone.parameters(), *self.projection_head.parameters(), *self.prediction_head.parameters()]


def test_byol_objective_trains_like_lightlys_byol():
    objective = make("byol", ssl_head=(32, 8), byol={"momentum": 0.9})
    reference = LightlyBYOL(objective, 0.9)
    trained = [n for n, p in objective.named_parameters() if p.requires_grad]
    assert all(n.startswith(("model.visual.", "head.", "predictor.")) for n in trained)
    lockstep(objective, reference, reference.trained)
    for ours, theirs in zip(objective.target_visual.parameters(), reference.backbone_momentum.parameters()):
        torch.testing.assert_close(ours, theirs, **CLOSE)  # the EMA targets moved alike


class LightlySimSiam(torch.nn.Module):
    def __init__(self, objective):
        super().__init__()
        self.backbone = copy.deepcopy(objective.model.visual)
        self.projection_head = copy_head(objective.head, lightly_heads.SimSiamProjectionHead(16, 32, 8))
        self.prediction_head = copy_head(objective.predictor, lightly_heads.SimSiamPredictionHead(8, 2, 8))
        self.criterion = LightlyNegCos()

    def step(self, batch, step, steps):
        z0, z1 = (self.projection_head(self.backbone(x)) for x in batch[:2])
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))

    def trained(self):
        return [*self.backbone.parameters(), *self.projection_head.parameters(), *self.prediction_head.parameters()]


def test_simsiam_objective_trains_like_lightlys_simsiam():
    objective = make("simsiam", ssl_head=(32, 32, 8))
    assert [p.shape[0] for n, p in objective.predictor.named_parameters() if n.endswith("weight")][0] == 2
    reference = LightlySimSiam(objective)
    lockstep(objective, reference, reference.trained)


class LightlyVICReg(torch.nn.Module):
    def __init__(self, objective):
        super().__init__()
        self.backbone = copy.deepcopy(objective.model.visual)
        self.projection_head = copy_head(objective.head, lightly_heads.VICRegProjectionHead(16, 32, 8, 3))
        self.criterion = LightlyVICRegLoss()

    def step(self, batch, step, steps):
        return self.criterion(*(self.projection_head(self.backbone(x)) for x in batch[:2]))

    def trained(self):
        return [*self.backbone.parameters(), *self.projection_head.parameters()]


def test_vicreg_objective_trains_like_lightlys_vicreg():
    objective = make("vicreg", ssl_head=(32, 32, 8))
    reference = LightlyVICReg(objective)
    lockstep(objective, reference, reference.trained)


class LightlySwaV(torch.nn.Module):
    """lightly's SwaV example (prototypes normalised before each step), with the prototypes' bias at zero
    and frozen, and the small crops through the same tower (its positional embeddings interpolated)."""

    def __init__(self, objective, freeze):
        super().__init__()
        from mmcl.models.multicrop import encode_any_size

        self.encode = encode_any_size
        self.backbone = copy.deepcopy(objective.model.visual)
        self.projection_head = copy_head(objective.head, lightly_heads.SwaVProjectionHead(16, 32, 8))
        self.prototypes = lightly_heads.SwaVPrototypes(8, 10, n_steps_frozen_prototypes=freeze)
        with torch.no_grad():
            self.prototypes.heads[0].weight.copy_(objective.prototypes.layer.weight)
            self.prototypes.heads[0].bias.zero_()
        self.prototypes.heads[0].bias.requires_grad_(False)
        self.criterion = LightlySwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)

    def step(self, batch, step, steps):
        self.prototypes.normalize()
        scores = [self.prototypes(torch.nn.functional.normalize(self.projection_head(self.encode(self.backbone, x)),
                                                                dim=1), step) for x in batch]
        self.prototypes.heads[0].bias.requires_grad_(False)
        return self.criterion(scores[:2], scores[2:])

    def trained(self):
        return [*self.backbone.parameters(), *self.projection_head.parameters(), self.prototypes.heads[0].weight]


def test_swav_objective_trains_like_lightlys_swav_with_frozen_prototypes_and_small_crops():
    objective = make("swav", ssl_head=(32, 8), data={"small_views": 2, "small_view_size": 8},
                     swav={"prototypes": 10, "freeze_prototypes_steps": 2})
    reference = LightlySwaV(objective, freeze=2)
    lockstep(objective, reference, reference.trained, steps=4, small=2)
    torch.testing.assert_close(objective.prototypes.layer.weight, reference.prototypes.heads[0].weight, **CLOSE)
