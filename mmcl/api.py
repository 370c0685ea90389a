"""mmcl's public Python API: the five things its commands do, as functions.

    import mmcl
    mmcl.build_shards("digits", "data/digits")                      # or a folder / CSV / JSONL of captioned images
    summary = mmcl.train("digits_clip_tiny", overrides=["data.train=[data/digits]", "train.max_steps=100"])
    result = mmcl.evaluate("runs/digits_clip_tiny", "data/digits")   # zero-shot, retrieval, probes
    mmcl.export("runs/digits_clip_tiny", "exported/")                # open_clip local-dir: folder
    model, preprocess, tokenizer = mmcl.load_model("local-dir:exported/")

Everything else (mmcl.trainer, mmcl.eval, mmcl.data_pipelines, ...) is internal and may change between
releases. Heavy imports happen inside the functions, so `import mmcl` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

PathLike = Union[str, Path]


def train(recipe: Any, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Train from a recipe: a YAML file, a name from recipes/ (e.g. "digits_clip_tiny") or a Recipe object,
    with dotted `overrides` ("optim.lr=1e-3"). Runs in this process, or in each process of an `accelerate
    launch` / torchrun. Returns the run's summary (also written to OUTPUT_DIR/summary.json).

    Raises mmcl.config.ConfigError (a ValueError) for a bad recipe, before any work starts."""
    from mmcl.cli import find_recipe
    from mmcl.config import Recipe, load_recipe
    from mmcl.trainer import train as run

    if isinstance(recipe, Recipe):
        if overrides:
            raise ValueError("overrides apply to a recipe file or name; change the Recipe object instead")
        return run(recipe)
    return run(load_recipe(find_recipe(str(recipe)), list(overrides)))


def load_model(spec: str, device: str = "cpu") -> Tuple[Any, Callable, Callable]:
    """(model, preprocess, tokenizer) from an mmcl run folder (`RUN` or `RUN:CHECKPOINT`), an open_clip
    `local-dir:` export, an open_clip architecture with weights (`NAME:FILE`, `NAME:TAG`, `NAME:hf-hub:ORG/REPO`)
    or a whole Hub model (`hf-hub:ORG/REPO`). The model is in eval mode on `device`."""
    from mmcl.models.loading import load_model as load

    return load(spec, device)


def evaluate(model: Union[str, Tuple[Any, Callable, Callable]], data: PathLike, task: Optional[str] = None,
             split: str = "test", device: Optional[str] = None, **options) -> Dict[str, Any]:
    """Evaluate a model (a load_model spec, or the (model, preprocess, tokenizer) it returns) on a dataset
    folder in CLIP_benchmark's layout. `task` None takes the folder's own task (zero-shot classification or
    retrieval); "knn" / "linear_probe" / "geometry" also work. `options` are mmcl.eval.EvalOptions fields
    (batch_size, workers, max_samples, amp, threads, recall_k, ...). `device` defaults to the CPU for a spec
    and to the model's device for a loaded model. Returns {"metrics", "samples", "skipped", "seconds", ...}."""
    from mmcl.eval import evaluate_dataset

    net, preprocess, tokenizer = load_model(model, device or "cpu") if isinstance(model, str) else model
    return evaluate_dataset(net, preprocess, tokenizer, str(data), split=split, task=task, device=device, **options)


def export(run_dir: PathLike, out_dir: PathLike, checkpoint: Optional[PathLike] = None) -> Path:
    """Write an open_clip `local-dir:` folder (config, safetensors weights, and an HF text tower's config and
    tokenizer) from a run's newest complete checkpoint, or `checkpoint`. Returns the folder."""
    from mmcl.models.loading import export_run

    return export_run(Path(run_dir), Path(out_dir), Path(checkpoint) if checkpoint is not None else None)


def build_shards(source: PathLike, out: PathLike, split: str = "train", **options) -> Dict[str, Any]:
    """Write webdataset shards in CLIP_benchmark's layout and return what was written.

    `source` is "digits" (the embedded handwritten digits: train and test splits; options `seed`,
    `shard_size`, `source="mnist"|"sklearn"`, `overwrite`), a folder of images with captions in NAME.txt, a
    .csv or a .jsonl file of image paths and captions (options `image_key`, `caption_key`, `label_key`,
    `sep` for CSV, `shard_size`, `resize`, `overwrite`)."""
    from mmcl.data_pipelines import writers
    from mmcl.data_pipelines.digits import build_digits

    if str(source) == "digits":
        return build_digits(str(out), **options)
    path = Path(source)
    if path.is_dir():
        return writers.write_from_folder(str(path), str(out), split, **options)
    if path.suffix.lower() in (".csv", ".tsv"):
        renamed = {"image_key": "image_col", "caption_key": "caption_col", "label_key": "label_col"}
        return writers.write_from_csv(str(path), str(out), split, **{renamed.get(k, k): v for k, v in options.items()})
    if path.suffix.lower() == ".jsonl":
        return writers.write_from_jsonl(str(path), str(out), split, **options)
    raise ValueError(f"build_shards: {source} is not 'digits', a folder, a .csv or a .jsonl file")
