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
from dataclasses import dataclass
from typing import Dict, List, Literal, Tuple


class OptionError(ValueError):
    """A bad objective option; the message starts with the dotted key (mmcl.config turns it into a ConfigError)."""


def positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise OptionError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def unit_interval(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise OptionError(f"{key}: must be in [0, 1], got {value}")


@dataclass
class ClipOptions:
    """CLIP's symmetric InfoNCE (also the CLIP half of SLIP)."""

    local_loss: bool = True  # each process scores its own rows against the global batch (open_clip's local_loss)
    gather_with_grad: bool = True  # gathered features keep their gradients (exact across processes)
    cross_modal_queue: int = 0  # MoCo-style image and text key queues of this size (0: off)
    momentum: float = 0.99  # EMA of the key model that fills the cross-modal queues
    momentum_cosine: bool = False  # anneal that momentum to 1 along a half cosine

    def check(self, key: str) -> None:
        positive(f"{key}.cross_modal_queue", self.cross_modal_queue, allow_zero=True)
        unit_interval(f"{key}.momentum", self.momentum)


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

    def check(self, key: str) -> None:
        positive(f"{key}.temperature", self.temperature)


@dataclass
class MoCoOptions:
    """MoCo v2 (queue of momentum keys) or v3 (predictor, keys of the global batch)."""

    version: Literal[2, 3] = 2
    temperature: float = 0.1  # MoCo v2: 0.2; v3 (ViT): 0.2
    queue_size: int = 4096  # v2 only; 65,536 at ImageNet scale
    momentum: float = 0.99  # EMA of the key encoder; 0.99-0.999 at scale
    momentum_cosine: bool = False  # anneal to 1 along a half cosine (BYOL / MoCo v3)

    def check(self, key: str) -> None:
        positive(f"{key}.temperature", self.temperature)
        positive(f"{key}.queue_size", self.queue_size)
        unit_interval(f"{key}.momentum", self.momentum)


@dataclass
class SlipOptions:
    """SLIP's weights of its CLIP and SimCLR terms (their own options are in `clip` and `simclr`)."""

    clip_weight: float = 1.0
    ssl_weight: float = 1.0

    def check(self, key: str) -> None:
        positive(f"{key}.clip_weight", self.clip_weight, allow_zero=True)
        positive(f"{key}.ssl_weight", self.ssl_weight, allow_zero=True)


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
