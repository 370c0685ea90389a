"""Recipes: every malformed recipe stops `mmcl train` with exit code 2, one line naming the key, nothing written."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import DELETE, REPO
from mmcl.cli import main
from mmcl.config import ConfigError, dump_recipe, load_recipe

# (id, recipe changes, text the single error line must contain). "{tmp}" is the test's tmp_path.
BAD_RECIPES = [
    ("unknown-top-level-key", {"trainer": {"epochs": 1}}, "trainer: unknown key"),
    ("unknown-nested-key", {"train.batchsize": 32}, "train.batchsize: unknown key"),
    ("unknown-tower-key", {"model.config.vision_cfg.patch_dropuot": 0.1}, "model.config.vision_cfg.patch_dropuot: unknown key"),
    ("unknown-model-config-key", {"model.config.embed_dims": 32}, "model.config.embed_dims: unknown key"),
    ("section-not-a-mapping", {"optim": 0.001}, "optim: expected a mapping"),
    ("string-for-int", {"train.batch_size": "many"}, "train.batch_size: expected int"),
    ("float-for-int", {"train.max_steps": 2.5}, "train.max_steps: expected int"),
    ("bool-for-int", {"train.batch_size": True}, "train.batch_size: expected int"),
    ("list-for-float", {"optim.lr": [0.001]}, "optim.lr: expected float"),
    ("bool-as-string", {"train.deterministic": "true"}, "train.deterministic: expected true or false"),
    ("string-for-embed-dim", {"model.config.embed_dim": "32"}, "model.config.embed_dim: must be a positive integer"),
    ("negative-lr", {"optim.lr": -1e-3}, "optim.lr: must be > 0"),
    ("infinite-lr", {"optim.lr": float("inf")}, "optim.lr: must be > 0"),
    ("zero-batch", {"train.batch_size": 0}, "train.batch_size: must be > 0"),
    ("zero-max-steps", {"train.max_steps": 0}, "train.max_steps: must be > 0"),
    ("batch-not-divisible-by-accum", {"train.batch_size": 30, "train.accum_steps": 4},
     "train.batch_size: 30 is not divisible by train.accum_steps=4"),
    ("betas-wrong-length", {"optim.betas": [0.9]}, "optim.betas: must be two numbers"),
    ("no-training-data", {"data.train": []}, "data.train: no training data"),
    ("missing-data-path", {"data.train": ["{tmp}/nowhere"]}, "data.train[0]:"),
    ("missing-split-folder", {"data.split": "validation"}, "data.train[0]: no such split folder"),
    ("missing-shard", {"data.train": ["{tmp}/broken"]}, "data.train[0]: missing shard"),
    ("remote-url-refused", {"data.train": ["pipe:cat /dev/null"]}, "data.train[0]: remote or pipe shard URL refused"),
    ("too-few-samples-for-a-batch", {"data.samples_per_epoch": 10}, "data.samples_per_epoch:"),
    ("bad-crop-scale", {"data.crop_scale": [0.9, 0.5]}, "data.crop_scale: must be [low, high]"),
    ("unknown-objective", {"objective.name": "barlow_twins"}, "objective.name: must be one of"),
    ("momentum-above-one", {"objective.clip.momentum": 1.5}, "objective.clip.momentum: must be in [0, 1]"),
    ("option-of-another-objective", {"objective.moco.queue_size": 64},
     "objective.moco: options of objective moco, but objective.name is clip"),
    ("flat-key-of-another-objective", {"objective.queue_size": 64},
     "objective.queue_size: not an option of objective clip (it is objective.moco.queue_size)"),
    ("flat-and-section-key-twice", {"objective.local_loss": False, "objective.clip.local_loss": True},
     "objective.local_loss: given twice (also as objective.clip.local_loss)"),
    ("bad-section-value", {"objective.clip.local_loss": "yes"}, "objective.clip.local_loss: expected true or false"),
    ("bad-precision", {"train.precision": "fp64"}, "train.precision: must be one of fp32, bf16, fp16"),
    ("arch-and-config", {"model.arch": "ViT-B-32"}, "model: give exactly one of model.arch"),
    ("neither-arch-nor-config", {"model.config": DELETE}, "model: give exactly one of model.arch"),
    ("missing-embed-dim", {"model.config.embed_dim": DELETE}, "model.config.embed_dim: missing"),
    ("weights-file-missing", {"model.pretrained": "{tmp}/missing.safetensors"}, "model.pretrained: weights file not found"),
    ("eval-dataset-missing", {"eval.datasets": ["{tmp}/no_eval_data"]}, "eval.datasets[0]: no split folder"),
    ("output-dir-under-a-file", {"train.output_dir": "{tmp}/a_file/run"}, "train.output_dir:"),
    ("resume-folder-missing", {"train.resume": "{tmp}/no_checkpoint"}, "train.resume:"),
]


def fill(value, tmp_path: Path):
    """Put the test's tmp_path into "{tmp}" placeholders, also inside lists."""
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp_path))
    if isinstance(value, list):
        return [fill(v, tmp_path) for v in value]
    return value


@pytest.fixture
def bad_inputs(tmp_path, digits_root):
    """A plain file (no directory can be made below it) and a dataset whose nshards.txt names a missing shard."""
    (tmp_path / "a_file").write_text("not a directory\n")
    split = tmp_path / "broken" / "train"
    split.mkdir(parents=True)
    shutil.copyfile(Path(digits_root) / "train" / "0.tar", split / "0.tar")
    (split / "nshards.txt").write_text("2\n")
    return tmp_path


def tree_snapshot(folder: Path) -> dict:
    return {p: p.stat().st_size for p in folder.rglob("*")}


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mmcl: error: ")
    return lines[0]


@pytest.mark.parametrize("changes, expected", [case[1:] for case in BAD_RECIPES], ids=[case[0] for case in BAD_RECIPES])
def test_bad_recipe_exits_2_naming_the_key_and_writes_nothing(changes, expected, tiny_recipe, bad_inputs, capsys,
                                                             fresh_accelerate_state):
    tmp_path = bad_inputs
    recipe = tiny_recipe({key: fill(value, tmp_path) for key, value in changes.items()})
    before = tree_snapshot(tmp_path)
    assert main(["train", str(recipe)]) == 2
    assert expected in error_line(capsys)
    assert tree_snapshot(tmp_path) == before
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lr=-1e-3"], "optim.lr: must be > 0"),
    (["train.batch_size=16", "train.output_dir={tmp}/a_file/run"], "train.output_dir:"),
], ids=["negative-lr", "output-dir-under-a-file"])
def test_bad_override_from_the_command_line(overrides, expected, tiny_recipe, bad_inputs, run_mmcl):
    tmp_path = bad_inputs
    recipe = tiny_recipe()
    before = tree_snapshot(tmp_path)
    result = run_mmcl(["train", recipe] + [fill(o, tmp_path) for o in overrides], timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcl: error: ") and expected in lines[0], result.stderr
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("text, expected", [
    ("train: [unclosed\n", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping of sections"),
], ids=["invalid-yaml", "not-a-mapping"])
def test_unreadable_recipe_file(text, expected, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert main(["train", str(recipe)]) == 2
    line = error_line(capsys)
    assert line.startswith("mmcl: error: recipe:") and expected in line


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "recipe: file not found" in error_line(capsys)


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size", "override must look like key.sub=value"),
    ("train.batch_size.x=1", "train.batch_size.x: batch_size is not a section"),
])
def test_malformed_override(override, expected, tiny_recipe, capsys):
    assert main(["train", str(tiny_recipe()), override]) == 2
    assert expected in error_line(capsys)


def test_dotted_overrides_change_values_and_parse_types(tiny_recipe, tmp_path):
    recipe = load_recipe(str(tiny_recipe()), ["train.batch_size=16", "optim.lr=1e-3", "train.max_steps=null",
                                              "data.crop_scale=[0.5, 1]", "model.config.vision_cfg.layers=1",
                                              "objective.clip.local_loss=false", "eval.split=test"])
    assert recipe.train.batch_size == 16
    assert isinstance(recipe.optim.lr, float) and recipe.optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert recipe.train.max_steps is None
    assert recipe.data.crop_scale == [0.5, 1.0] and all(isinstance(x, float) for x in recipe.data.crop_scale)
    assert recipe.model.config["vision_cfg"]["layers"] == 1
    assert recipe.model.config["text_cfg"]["layers"] == 2  # siblings untouched
    assert recipe.objective.clip.local_loss is False


def test_objective_options_live_in_the_sections_the_objective_reads(tiny_recipe, tmp_path):
    recipe = load_recipe(str(tiny_recipe()), ["objective.name=slip", "data.num_views=2",
                                              "objective.simclr.temperature=0.3"])
    assert recipe.objective.simclr.temperature == 0.3
    assert recipe.objective.slip.ssl_weight == 1.0 and recipe.objective.clip.local_loss is True  # defaults
    assert recipe.objective.moco is None and recipe.objective.siglip is None  # sections slip does not read
    dumped = tmp_path / "config.yaml"
    dump_recipe(recipe, dumped)
    assert set(yaml.safe_load(dumped.read_text())["objective"]) == {"name", "chunk_size", "slip", "clip", "simclr"}
    assert load_recipe(str(dumped)) == recipe


def test_flat_objective_keys_of_mmcl_0_1_still_load_with_a_warning(tiny_recipe):
    with pytest.warns(FutureWarning, match="objective.temperature is deprecated.*objective.moco.temperature"):
        recipe = load_recipe(str(tiny_recipe({"objective.name": "moco", "objective.temperature": 0.25,
                                              "objective.moco_version": 3, "data.num_views": 2})))
    assert recipe.objective.moco.temperature == 0.25 and recipe.objective.moco.version == 3


def test_a_section_set_to_null_is_absent(tiny_recipe):
    moco = tiny_recipe({"objective.name": "moco", "objective.moco.queue_size": 64, "data.num_views": 2})
    recipe = load_recipe(str(moco), ["objective.name=clip", "objective.moco=null"])
    assert recipe.objective.name == "clip" and recipe.objective.moco is None


def test_override_fills_an_empty_section(tmp_path, digits_root):
    tree = {"model": {"arch": "RN50"}, "data": {"train": [digits_root]}, "train": None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    recipe = load_recipe(str(path), [f"train.output_dir={tmp_path / 'run'}", "train.batch_size=8"])
    assert recipe.train.batch_size == 8 and recipe.train.epochs == 1  # the rest keeps its defaults


def test_single_source_may_be_written_without_a_list(tiny_recipe, digits_root):
    recipe = load_recipe(str(tiny_recipe({"data.train": digits_root})))
    assert recipe.data.train == [digits_root]


def test_resolved_recipe_round_trips(tiny_recipe, tmp_path):
    recipe = load_recipe(str(tiny_recipe()), ["optim.lr=3e-4", "train.accum_steps=2"])
    dumped = tmp_path / "config.yaml"
    dump_recipe(recipe, dumped)
    assert load_recipe(str(dumped)) == recipe


def test_config_error_names_the_key_in_python(tiny_recipe):
    with pytest.raises(ConfigError, match=r"^optim\.weight_decay: must be >= 0"):
        load_recipe(str(tiny_recipe()), ["optim.weight_decay=-0.1"])


def test_shipped_recipe_is_valid(digits_root, tmp_path):
    recipe = load_recipe(str(REPO / "recipes" / "digits_clip_tiny.yaml"), [f"data.train=[{digits_root}]", f"eval.datasets=[{digits_root}]",
                                                           f"eval.retrieval=[{digits_root}]",
                                                           f"train.output_dir={tmp_path / 'run'}"])
    assert recipe.objective.name == "clip" and recipe.train.batch_size % recipe.train.accum_steps == 0


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses_into_the_schema(path):
    from mmcl.config import Recipe, from_dict, load_tree

    recipe = from_dict(Recipe, load_tree(str(path)))
    assert recipe.data.train and recipe.train.output_dir.startswith("runs/")


def test_cross_modal_queue_is_refused_for_objectives_without_one(tiny_recipe, capsys):
    from mmcl.cli import main

    code = main(["train", str(tiny_recipe({"objective.name": "siglip", "objective.cross_modal_queue": 64}))])
    assert code == 2
    assert "objective.cross_modal_queue" in capsys.readouterr().err


def test_deprecated_flat_key_warns_on_one_line_from_the_command_line(tiny_recipe, run_mmcl):
    done = run_mmcl(["train", tiny_recipe(), "objective.name=simclr", "data.num_views=2",
                     "objective.temperature=0.3", "optim.lr=-1"])
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines == ["mmcl: warning: objective.temperature is deprecated and will be removed in mmcl 0.3; write "
                     "objective.simclr.temperature", "mmcl: error: optim.lr: must be > 0, got -1.0"]
