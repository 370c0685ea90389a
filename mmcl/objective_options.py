"""Each objective's options in its own typed section of the recipe, checked by the section itself.

    objective:
      name: moco
      moco: {version: 2, temperature: 0.2, queue_size: 4096, momentum: 0.99}

An objective reads the sections listed in `SECTIONS` (SLIP reads its own weights plus CLIP's and SimCLR's
options); a recipe that gives a section the named objective does not read is refused, so a misplaced option
never goes silently unused. The flat keys of mmcl 0.1 (`objective.temperature`, `objective.queue_size`, ...)
are still read, with a warning, for one release: `move_flat_keys` puts each where the named objective reads it.

This module imports no torch, so `mmcl.config` can build the schema without loading models.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Tuple


class OptionError(ValueError):
    """A bad objective option; the message starts with the dotted key (mmcl.config turns it into a ConfigError)."""


def positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise OptionError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def unit_interval(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise OptionError(f"{key}: must be in [0, 1], got {value}")


# ---- label-aware, hard-negative, mixing and text-side options, shared by several sections -------------------

@dataclass
class HardNegatives:
    """Weights on the negatives of an InfoNCE term (a block of `clip`, `simclr` and `moco`); zeros: plain InfoNCE."""

    beta: float = 0.0  # HCL (Robinson et al. 2021): weights exp(beta * logit); 0.5-1 in the paper
    tau_plus: float = 0.0  # debiasing class prior (Chuang et al. 2020); ~1 / number of classes
    decoupled: bool = False  # Yeh et al. 2022: the positive leaves the denominator

    def check(self, key: str) -> None:
        positive(f"{key}.beta", self.beta, allow_zero=True)
        if not 0 <= self.tau_plus < 1:
            raise OptionError(f"{key}.tau_plus: must be in [0, 1), got {self.tau_plus}")

    @property
    def active(self) -> bool:
        return bool(self.beta or self.tau_plus or self.decoupled)


@dataclass
class MoCHiOptions:
    """MoCHi (Kalantidis et al. 2020): synthetic hard negatives per query, mixed from its hardest queue entries."""

    top_k: int = 0  # N: how many of the hardest queue entries each query mixes from (0: off; 1024 in the paper)
    s: int = 0  # negatives mixed from two of them (1024 in the paper)
    s_prime: int = 0  # negatives mixed from the query and one of them (256 in the paper)

    def check(self, key: str) -> None:
        for name in ("top_k", "s", "s_prime"):
            positive(f"{key}.{name}", getattr(self, name), allow_zero=True)
        if (self.s or self.s_prime) and self.top_k < 2:
            raise OptionError(f"{key}.top_k: must be >= 2 to mix s / s_prime negatives, got {self.top_k}")

    @property
    def active(self) -> bool:
        return bool(self.top_k and (self.s or self.s_prime))


@dataclass
class SimCSEOptions:
    """The text-side term of CLIP (`clip.text_ssl_weight`): SimCSE (Gao et al. 2021) with ConSERT's token views."""

    temperature: float = 0.05  # SimCSE's
    token_shuffle: bool = False  # ConSERT: the second view's caption tokens in a random order
    token_cutoff: float = 0.0  # ConSERT-style cutoff: this fraction of the second view's caption tokens removed

    def check(self, key: str) -> None:
        positive(f"{key}.temperature", self.temperature)
        if not 0 <= self.token_cutoff < 1:
            raise OptionError(f"{key}.token_cutoff: must be in [0, 1), got {self.token_cutoff}")


def check_imix(key: str, alpha: float, hard_negatives: HardNegatives) -> None:
    positive(f"{key}.imix_alpha", alpha, allow_zero=True)
    if alpha and hard_negatives.active:
        raise OptionError(f"{key}.imix_alpha: i-Mix's mixed targets do not combine with {key}.hard_negatives "
                          f"(which needs one positive per row)")


# ---- the sections ------------------------------------------------------------------------------------------

@dataclass
class ClipOptions:
    """CLIP's symmetric InfoNCE (also the CLIP half of SLIP)."""

    local_loss: bool = True  # each process scores its own rows against the global batch (open_clip's local_loss)
    gather_with_grad: bool = True  # gathered features keep their gradients (exact across processes)
    cross_modal_queue: int = 0  # MoCo-style image and text key queues of this size (0: off)
    momentum: float = 0.99  # EMA of the key model that fills the cross-modal queues
    momentum_cosine: bool = False  # anneal that momentum to 1 along a half cosine
    hard_negatives: HardNegatives = field(default_factory=HardNegatives)  # both directions
    mochi: MoCHiOptions = field(default_factory=MoCHiOptions)  # synthetic negatives (cross-modal queues only)
    imix_alpha: float = 0.0  # i-Mix: images mixed with lambda ~ Beta(alpha, alpha), targets mixed (0: off)
    label_positives: bool = False  # SupCon-style: pairs of the same class (`cls`) are positives, not negatives
    text_ssl_weight: float = 0.0  # weight of the SimCSE text term (needs model.text_dropout or token views)
    simcse: SimCSEOptions = field(default_factory=SimCSEOptions)

    def check(self, key: str) -> None:
        positive(f"{key}.cross_modal_queue", self.cross_modal_queue, allow_zero=True)
        unit_interval(f"{key}.momentum", self.momentum)
        self.hard_negatives.check(f"{key}.hard_negatives")
        self.mochi.check(f"{key}.mochi")
        self.simcse.check(f"{key}.simcse")
        positive(f"{key}.text_ssl_weight", self.text_ssl_weight, allow_zero=True)
        check_imix(key, self.imix_alpha, self.hard_negatives)
        self.check_combinations(key)

    def check_combinations(self, key: str) -> None:
        if self.label_positives and (self.hard_negatives.active or self.imix_alpha):
            raise OptionError(f"{key}.label_positives: several positives per row do not combine with "
                              f"{key}.hard_negatives or {key}.imix_alpha")
        if self.mochi.active and not self.cross_modal_queue:
            raise OptionError(f"{key}.mochi: MoCHi mixes queue entries; set {key}.cross_modal_queue")
        if self.cross_modal_queue and (self.label_positives or self.imix_alpha):
            raise OptionError(f"{key}.cross_modal_queue: does not combine with label_positives or imix_alpha")


@dataclass
class SigLipOptions:
    """SigLIP's pairwise sigmoid loss."""

    dist_impl: Literal["ring", "gather"] = "ring"  # how text features travel between processes

    def check(self, key: str) -> None:
        pass


@dataclass
class SimCLROptions:
    """SimCLR's NT-Xent over two or more augmented views (also SLIP's image-only term)."""

    temperature: float = 0.1  # SimCLR: 0.1-0.5; SLIP: 0.1
    hard_negatives: HardNegatives = field(default_factory=HardNegatives)  # HCL / DCL / decoupled
    imix_alpha: float = 0.0  # i-Mix on view 0 (0: off; 1.0 in the paper)

    def check(self, key: str) -> None:
        positive(f"{key}.temperature", self.temperature)
        self.hard_negatives.check(f"{key}.hard_negatives")
        check_imix(key, self.imix_alpha, self.hard_negatives)


@dataclass
class MoCoOptions:
    """MoCo v2 (queue of momentum keys) or v3 (predictor, keys of the global batch)."""

    version: Literal[2, 3] = 2
    temperature: float = 0.1  # MoCo v2: 0.2; v3 (ViT): 0.2
    queue_size: int = 4096  # v2 only; 65,536 at ImageNet scale
    momentum: float = 0.99  # EMA of the key encoder; 0.99-0.999 at scale
    momentum_cosine: bool = False  # anneal to 1 along a half cosine (BYOL / MoCo v3)
    hard_negatives: HardNegatives = field(default_factory=HardNegatives)  # HCL / DCL / decoupled
    mochi: MoCHiOptions = field(default_factory=MoCHiOptions)  # v2 only: synthetic hard negatives from the queue
    imix_alpha: float = 0.0  # i-Mix on view 0 (0: off)

    def check(self, key: str) -> None:
        positive(f"{key}.temperature", self.temperature)
        positive(f"{key}.queue_size", self.queue_size)
        unit_interval(f"{key}.momentum", self.momentum)
        self.hard_negatives.check(f"{key}.hard_negatives")
        self.mochi.check(f"{key}.mochi")
        check_imix(key, self.imix_alpha, self.hard_negatives)
        if self.mochi.active and (self.version == 3 or self.imix_alpha):
            raise OptionError(f"{key}.mochi: needs MoCo v2's queue and one positive per query "
                              f"(version 2, no imix_alpha)")


@dataclass
class SlipOptions:
    """SLIP's weights of its CLIP and SimCLR terms (their own options are in `clip` and `simclr`)."""

    clip_weight: float = 1.0
    ssl_weight: float = 1.0

    def check(self, key: str) -> None:
        positive(f"{key}.clip_weight", self.clip_weight, allow_zero=True)
        positive(f"{key}.ssl_weight", self.ssl_weight, allow_zero=True)


# ---- objectives on labels and margins: SupCon, triplet, pairwise (Hadsell), VSE++ --------------------------

@dataclass
class SupConOptions:
    """SupCon (Khosla et al. 2020): two views, every same-class view of the global batch a positive."""

    temperature: float = 0.1  # the paper's

    def check(self, key: str) -> None:
        positive(f"{key}.temperature", self.temperature)


@dataclass
class TripletOptions:
    """Triplet margin loss on two views, negatives mined in the global batch."""

    margin: float = 0.2  # on Euclidean distances of unit vectors (0-2)
    mining: Literal["semihard", "hardest", "all"] = "semihard"
    labels: bool = False  # class labels (`cls`): negatives only among views of other classes (FaceNet)

    def check(self, key: str) -> None:
        positive(f"{key}.margin", self.margin)


@dataclass
class PairwiseOptions:
    """Hadsell et al.'s margin-based contrastive (pairwise) loss on two views."""

    margin: float = 1.0  # negatives farther than this (Euclidean, unit vectors: 0-2) cost nothing
    labels: bool = False  # class labels (`cls`): every view of the same class a positive, the rest negatives

    def check(self, key: str) -> None:
        positive(f"{key}.margin", self.margin)


@dataclass
class VSEOptions:
    """VSE++ (Faghri et al. 2018): image-text hinge ranking over the global batch."""

    margin: float = 0.2
    violation: Literal["max", "sum"] = "max"  # max: the hardest negative (VSE++); sum: every violation (VSE0)
    sum_warmup_steps: int = 0  # sum of violations for this many steps before max (VSE-infinity's warm-up)

    def check(self, key: str) -> None:
        positive(f"{key}.margin", self.margin)
        positive(f"{key}.sum_warmup_steps", self.sum_warmup_steps, allow_zero=True)


# section name -> its options class; objective name -> the sections it reads (its own first)
SECTION_TYPES = {"clip": ClipOptions, "siglip": SigLipOptions, "simclr": SimCLROptions, "moco": MoCoOptions,
                 "slip": SlipOptions}
SECTIONS: Dict[str, Tuple[str, ...]] = {
    "clip": ("clip",),
    "siglip": ("siglip",),
    "simclr": ("simclr",),
    "moco": ("moco",),
    "slip": ("slip", "clip", "simclr"),
}
# objectives on labels and margins
SECTION_TYPES.update({"supcon": SupConOptions, "triplet": TripletOptions, "pairwise": PairwiseOptions,
                      "vse": VSEOptions})
SECTIONS.update({"supcon": ("supcon",), "triplet": ("triplet",), "pairwise": ("pairwise",), "vse": ("vse",)})
NAMES: List[str] = list(SECTIONS)

# mmcl 0.1's flat keys: flat name -> (section, key) candidates; the first section the objective reads wins
FLAT_KEYS = {
    "local_loss": [("clip", "local_loss")],
    "gather_with_grad": [("clip", "gather_with_grad")],
    "cross_modal_queue": [("clip", "cross_modal_queue")],
    "temperature": [("simclr", "temperature"), ("moco", "temperature")],
    "queue_size": [("moco", "queue_size")],
    "momentum": [("moco", "momentum"), ("clip", "momentum")],
    "momentum_cosine": [("moco", "momentum_cosine"), ("clip", "momentum_cosine")],
    "moco_version": [("moco", "version")],
    "clip_weight": [("slip", "clip_weight")],
    "ssl_weight": [("slip", "ssl_weight")],
}


def move_flat_keys(tree: dict, overriding: bool = False) -> None:
    """Move mmcl 0.1's flat objective keys into the sections of the named objective, warning once per key.

    A flat key that the named objective has no use for is refused like a misplaced section option. A flat key
    beside its section key is refused as given twice, unless `overriding` (a command-line override wins).
    """
    name = tree.get("name", "clip")
    reads = SECTIONS.get(name, ())
    for flat in [k for k in tree if k in FLAT_KEYS]:
        targets = [(s, k) for s, k in FLAT_KEYS[flat] if s in reads]
        if not targets:
            owners = ", ".join(f"objective.{s}.{k}" for s, k in FLAT_KEYS[flat])
            raise OptionError(f"objective.{flat}: not an option of objective {name} (it is {owners})")
        section, key = targets[0]
        node = tree.get(section)
        if node is None:
            node = tree[section] = {}
        if not isinstance(node, dict):
            raise OptionError(f"objective.{section}: expected a mapping, got {type(node).__name__} {node!r}")
        if key in node and not overriding:
            raise OptionError(f"objective.{flat}: given twice (also as objective.{section}.{key})")
        node[key] = tree.pop(flat)
        warnings.warn(f"objective.{flat} is deprecated and will be removed in mmcl 0.3; write "
                      f"objective.{section}.{key}", FutureWarning, stacklevel=2)


def check_sections(name: str, given: List[str]) -> None:
    """Refuse a section the named objective does not read (its options would be silently ignored)."""
    reads = SECTIONS[name]
    for section in given:
        if section not in reads:  # (a section set to null is absent: `objective.slip=null` drops it)
            raise OptionError(f"objective.{section}: options of objective {section}, but objective.name is "
                              f"{name} (it reads {', '.join('objective.' + s for s in reads)})")


# ---- objectives without negatives (BYOL, SimSiam, VICReg) and with prototypes (SwAV, PCL) -----------------
from dataclasses import field  # noqa: E402  (imports of this block, kept with it)
from typing import Optional  # noqa: E402


def head_sizes(key: str, sizes) -> None:
    if sizes is not None and (not sizes or any(d <= 0 for d in sizes)):
        raise OptionError(f"{key}: must be a list of positive sizes (hidden..., out), got {sizes}")


@dataclass
class ByolOptions:
    """BYOL: the online network's predictor regresses the projection of an EMA target network."""

    momentum: float = 0.99  # m0, the target's EMA momentum at step 0 (BYOL: 0.996 at batch 4096)
    momentum_cosine: bool = True  # raise it to 1 along a half cosine over the run (BYOL's schedule)
    predictor: Optional[List[int]] = None  # hidden..., out; default [model.ssl_head[0], model.ssl_head[-1]]

    def check(self, key: str) -> None:
        unit_interval(f"{key}.momentum", self.momentum)
        head_sizes(f"{key}.predictor", self.predictor)


@dataclass
class SimSiamOptions:
    """SimSiam: predictor + stop-gradient, no momentum copy; the projector ends in BatchNorm."""

    predictor: Optional[List[int]] = None  # hidden..., out; default [out // 4, out] (SimSiam's bottleneck)

    def check(self, key: str) -> None:
        head_sizes(f"{key}.predictor", self.predictor)


@dataclass
class VICRegOptions:
    """VICReg: invariance + variance + covariance, the last two over the global batch."""

    invariance_weight: float = 25.0  # lambda
    variance_weight: float = 25.0  # mu
    covariance_weight: float = 1.0  # nu
    eps: float = 1.0e-4  # inside the square root of the variance
    gather_distributed: bool = True  # variance and covariance of the global batch (gathered with gradients)

    def check(self, key: str) -> None:
        for name in ("invariance_weight", "variance_weight", "covariance_weight"):
            positive(f"{key}.{name}", getattr(self, name), allow_zero=True)
        positive(f"{key}.eps", self.eps)


@dataclass
class SwAVOptions:
    """SwAV: swapped prediction of Sinkhorn-Knopp codes over learnable prototypes, multi-crop views."""

    prototypes: int = 3000
    temperature: float = 0.1
    sinkhorn_iterations: int = 3
    sinkhorn_epsilon: float = 0.05
    freeze_prototypes_steps: int = 313  # the prototypes get no update for this many first steps
    queue_size: int = 0  # past features of each large crop (SwAV: 3840 for small batches); 0: no queue
    queue_start: int = 0  # step from which features are queued (SwAV: epoch 15); the queue is used once full

    def check(self, key: str) -> None:
        positive(f"{key}.prototypes", self.prototypes)
        positive(f"{key}.temperature", self.temperature)
        positive(f"{key}.sinkhorn_iterations", self.sinkhorn_iterations)
        positive(f"{key}.sinkhorn_epsilon", self.sinkhorn_epsilon)
        for name in ("freeze_prototypes_steps", "queue_size", "queue_start"):
            positive(f"{key}.{name}", getattr(self, name), allow_zero=True)


@dataclass
class PCLOptions:
    """PCL: ProtoNCE over k-means prototypes of the momentum encoder's features, added to MoCo v2's InfoNCE.

    Its InfoNCE half reads `objective.moco` (temperature, queue, momentum; version 2)."""

    num_clusters: List[int] = field(default_factory=lambda: [25000, 50000, 100000])  # PCL's, for ImageNet
    warmup_epochs: int = 20  # InfoNCE alone for these first epochs (PCL: 20 of 200)
    negatives: int = 16000  # r: negative prototypes sampled per clustering
    kmeans: Literal["sklearn", "faiss"] = "sklearn"  # the clustering library (faiss: pip install faiss-cpu)
    kmeans_iters: int = 20
    alpha: float = 10.0  # concentration of a cluster: mean distance / log(size + alpha)

    def check(self, key: str) -> None:
        if not self.num_clusters or any(k < 2 for k in self.num_clusters):
            raise OptionError(f"{key}.num_clusters: must be a list of cluster counts >= 2, got {self.num_clusters}")
        positive(f"{key}.warmup_epochs", self.warmup_epochs, allow_zero=True)
        for name in ("negatives", "kmeans_iters", "alpha"):
            positive(f"{key}.{name}", getattr(self, name))


SECTION_TYPES.update({"byol": ByolOptions, "simsiam": SimSiamOptions, "vicreg": VICRegOptions,
                      "swav": SwAVOptions, "pcl": PCLOptions})
SECTIONS.update({"byol": ("byol",), "simsiam": ("simsiam",), "vicreg": ("vicreg",), "swav": ("swav",),
                 "pcl": ("pcl", "moco")})
NAMES.extend(["byol", "simsiam", "vicreg", "swav", "pcl"])
