"""The label-aware, hard-negative, margin and text-side objectives and options, through the real trainer.

- each new objective (supcon, triplet, pairwise, vse) and CLIP with label positives + the SimCSE term trains
  from a recipe on the embedded digits, with kNN / zero-shot accuracy well above chance and above the
  untrained towers;
- the options are typed, checked before any work starts, and reach the losses (HCL, MoCHi, i-Mix, label
  positives, SimCSE, text dropout);
- i-Mix under feature-cache accumulation gives the plain backward's gradients;
- every new recipe loads and builds offline.
"""
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator

import mmcl.eval as mmcl_eval
from mmcl.config import ConfigError, ModelConfig, ObjectiveConfig, Recipe, from_dict, load_recipe
from mmcl.losses import NegativeWeighting
from mmcl import load_model, train
from mmcl.models import build_model, eval_preprocess, make_tokenizer
from mmcl.models.dropout import add_text_dropout
from mmcl.objective_options import SECTION_TYPES
from mmcl.objectives import REGISTRY, build_objective
from mmcl.objectives.text_ssl import token_views
from mmcl.trainer import step as T

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
DIGITS_MODEL = {"embed_dim": 64,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                               "mlp_ratio": 2.0},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                             "mlp_ratio": 2.0}}
NEW_RECIPES = ("cifar10_supcon_tiny", "cifar10_simclr_hcl_tiny", "cifar10_simclr_imix_tiny", "cifar10_triplet_tiny",
               "cifar10_moco_mochi_tiny", "flickr8k_clip_hcl_tiny", "flickr8k_vse_tiny", "flickr8k_clip_simcse_tiny",
               "digits_clip_label_positives", "supcon_resnet50", "simclr_hcl_resnet50")


def make(name: str, **sections):
    torch.manual_seed(0)
    options = {s: from_dict(SECTION_TYPES[s], values, f"objective.{s}.") for s, values in sections.items()}
    recipe = Recipe(model=ModelConfig(config=TINY, ssl_head=[16]), objective=ObjectiveConfig(name=name, **options))
    return build_objective(recipe, build_model(recipe.model)[0])


def make_batch(rows: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(rows, 3, 16, 16, generator=g) for _ in range(2)],
            "image": torch.randn(rows, 3, 16, 16, generator=g),
            "text": torch.randint(1, 63, (rows, 8), generator=g),
            "label": torch.randint(0, 3, (rows,), generator=g)}


# ---- options: typed, checked, wired to the losses ----------------------------------------------------------

def recipe_with(tmp_path, root, objective: dict, model: dict = None) -> Recipe:
    tree = {"model": {"config": TINY, **(model or {})}, "data": {"train": [root], "workers": 0},
            "objective": objective, "train": {"output_dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_recipe(str(path))


@pytest.mark.parametrize("objective,model,message", [
    ({"name": "simclr", "simclr": {"imix_alpha": 1.0, "hard_negatives": {"beta": 1.0}}}, None,
     "objective.simclr.imix_alpha: i-Mix's mixed targets do not combine"),
    ({"name": "clip", "clip": {"mochi": {"top_k": 8, "s": 4}}}, None, "objective.clip.mochi: MoCHi mixes queue"),
    ({"name": "moco", "moco": {"version": 3, "mochi": {"top_k": 8, "s": 4}}}, None, "objective.moco.mochi: needs"),
    ({"name": "moco", "moco": {"mochi": {"top_k": 1, "s": 4}}}, None, "objective.moco.mochi.top_k: must be >= 2"),
    ({"name": "clip", "clip": {"label_positives": True, "hard_negatives": {"tau_plus": 0.1}}}, None,
     "objective.clip.label_positives: several positives"),
    ({"name": "clip", "clip": {"hard_negatives": {"tau_plus": 1.0}}}, None, "tau_plus: must be in"),
    ({"name": "clip", "clip": {"text_ssl_weight": 1.0}}, None, "SimCSE's two views of a caption would be identical"),
    ({"name": "clip"}, {"text_dropout": 1.5}, "model.text_dropout: must be in"),
    ({"name": "triplet", "triplet": {"mining": "easy"}}, None, "objective.triplet.mining: must be one of"),
    ({"name": "vse", "clip": {"local_loss": True}}, None, "objective.clip: options of objective clip, but"),
    ({"name": "supcon", "temperature": 0.2}, None, "objective.temperature: not an option of objective supcon"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, digits_root, objective, model, message):
    with pytest.raises(ConfigError, match=message):
        recipe_with(tmp_path, digits_root, objective, model)
    assert not (tmp_path / "run").exists()


def test_objectives_on_labels_refuse_data_without_classes(tmp_path):
    import webdataset as wds

    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "0.tar")) as sink:
        sink.write({"__key__": "a", "png": (torch.rand(8, 8, 3) * 255).byte().numpy(), "txt": "a caption"})
    with pytest.raises(ConfigError, match=r"data.train\[0\]: objective supcon needs class labels .* has png, txt"):
        recipe_with(tmp_path, str(tmp_path / "shards" / "0.tar"), {"name": "supcon"})
    with pytest.raises(ConfigError, match="objective clip needs class labels"):
        recipe_with(tmp_path, str(tmp_path / "shards" / "0.tar"), {"name": "clip", "clip": {"label_positives": True}})
    for name in ("triplet", "pairwise"):
        with pytest.raises(ConfigError, match=f"objective {name} needs class labels"):
            recipe_with(tmp_path, str(tmp_path / "shards" / "0.tar"), {"name": name, name: {"labels": True}})
        recipe_with(tmp_path, str(tmp_path / "shards" / "0.tar"), {"name": name})  # the other view: no labels


def test_options_reach_the_losses():
    assert {"supcon", "triplet", "pairwise", "vse"} <= set(REGISTRY)
    simclr = make("simclr", simclr={"hard_negatives": {"beta": 0.5, "tau_plus": 0.1}})
    assert simclr.loss_fn.weighting == NegativeWeighting(0.5, 0.1)
    moco = make("moco", moco={"queue_size": 16, "mochi": {"top_k": 4, "s": 2, "s_prime": 1},
                              "hard_negatives": {"decoupled": True}})
    assert moco.loss_fn.mochi == (4, 2, 1) and moco.loss_fn.weighting.decoupled
    clip = make("clip", clip={"label_positives": True, "text_ssl_weight": 0.5, "simcse": {"token_shuffle": True}})
    assert clip.uses_labels and clip.text_ssl.temperature == 0.05
    losses = clip.losses(clip.encode(make_batch()))
    assert set(losses) == {"loss", "loss/clip", "loss/simcse"}
    torch.testing.assert_close(losses["loss"], losses["loss/clip"] + 0.5 * losses["loss/simcse"])
    xqueue = make("clip", clip={"cross_modal_queue": 16, "mochi": {"top_k": 4, "s": 2}})
    assert xqueue.mochi == (4, 2, 0) and torch.isfinite(xqueue.losses(xqueue.encode(make_batch()))["loss"])
    vse = make("vse", vse={"violation": "max", "sum_warmup_steps": 2})
    assert not vse.model.logit_scale.requires_grad
    for step, expected in ((0, "sum"), (1, "sum"), (2, "max")):
        vse.before_step(step, 10)
        assert vse.loss_fn.violation == expected
    supcon = make("supcon")
    assert supcon.uses_labels and supcon.uses_views and not supcon.uses_text


@pytest.mark.parametrize("name,sections", [("simclr", {"simclr": {"imix_alpha": 1.0}}),
                                           ("moco", {"moco": {"imix_alpha": 1.0, "queue_size": 16}}),
                                           ("moco", {"moco": {"imix_alpha": 1.0, "version": 3}}),
                                           ("clip", {"clip": {"imix_alpha": 1.0}}),
                                           ("clip", {"clip": {"label_positives": True}}),
                                           ("supcon", {})])
def test_imix_and_labels_under_feature_cache_accumulation(name, sections):
    """Each micro-batch draws its own i-Mix lambda and partners; the cached backward replays those draws and
    gives the gradients of encoding both halves with gradients and one loss over them."""
    plain, cached = make(name, **sections), make(name, **sections)
    micro = T.split_batch(make_batch(rows=8), 2)
    torch.manual_seed(3)
    cached_losses = T.cached_backward(cached, micro, Accelerator(cpu=True))
    torch.manual_seed(3)
    chunks = [plain.encode(mb) for mb in micro]
    plain_losses = plain.losses({k: torch.cat([c[k] for c in chunks]) for k in chunks[0]})
    plain_losses["loss"].backward()
    torch.testing.assert_close(cached_losses["loss"], plain_losses["loss"].detach(), atol=1e-5, rtol=1e-5)
    grads = 0
    for (key, a), b in zip(plain.named_parameters(), cached.parameters()):
        assert (a.grad is None) == (b.grad is None), key
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=key)
            grads += 1
    assert grads > 0


def test_text_dropout_changes_training_passes_only():
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(config=TINY, text_dropout=0.2))
    plain, _ = build_model(ModelConfig(config=TINY))
    assert set(model.state_dict()) == set(plain.state_dict())  # no new weights: exports are unchanged
    tokens = torch.randint(1, 63, (4, 8))
    model.train()
    assert not torch.allclose(model.encode_text(tokens), model.encode_text(tokens))
    model.eval()
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(tokens))
    from open_clip.transformer import LayerScale

    scaled, _ = build_model(ModelConfig(config={**TINY, "text_cfg": {**TINY["text_cfg"], "ls_init_value": 0.5}}))
    assert add_text_dropout(scaled, 0.3) == 2 and isinstance(scaled.transformer.resblocks[0].ls_1, LayerScale)


def test_token_views_keep_the_special_tokens():
    tokens = torch.tensor([[49406, 5, 6, 7, 8, 9, 49407, 0], [49406, 5, 0, 49407, 0, 0, 0, 0]])  # 0: "!" or padding
    torch.manual_seed(0)
    shuffled = token_views(tokens, shuffle=True, cutoff=0.0)
    assert torch.equal(shuffled[:, 0], tokens[:, 0]) and shuffled[0, 6] == 49407 and shuffled[0, 7] == 0
    assert sorted(shuffled[0, 1:6].tolist()) == [5, 6, 7, 8, 9] and shuffled[1, 3] == 49407
    assert sorted(shuffled[1, 1:3].tolist()) == [0, 5]
    cut = token_views(tokens, shuffle=False, cutoff=0.4)
    assert cut[0].tolist()[:5] in ([49406] + c + [49407] for c in ([5, 6, 7], [5, 6, 8], [5, 6, 9], [5, 7, 8],
                                                                  [5, 7, 9], [5, 8, 9], [6, 7, 8], [6, 7, 9],
                                                                  [6, 8, 9], [7, 8, 9]))
    assert (cut[0] != 0).sum() == 5 and torch.equal(token_views(tokens, False, 0.0), tokens)


# ---- every new objective learns on the digits ----------------------------------------------------------------

def digits_tree(root: str, out: Path, objective: dict, steps: int, **model) -> dict:
    return {"model": {"config": DIGITS_MODEL, "ssl_head": [128, 64], **model},
            "data": {"train": [root], "workers": 0, "shuffle_buffer": 200, "view_crop_scale": [0.5, 1.0],
                     "crop_scale": [1.0, 1.0]},
            "objective": objective,
            "optim": {"lr": 2.0e-3, "weight_decay": 0.05, "warmup_steps": 5},
            "train": {"output_dir": str(out), "batch_size": 64, "max_steps": steps, "progress": False,
                      "log_every": 10, "save_every": 0},
            "eval": {"datasets": []}}


def score(model, root: str, task: str) -> float:
    tokenizer = make_tokenizer({"text_cfg": DIGITS_MODEL["text_cfg"]}) if task == "zeroshot_classification" else None
    result = mmcl_eval.evaluate_dataset(model, eval_preprocess(model), tokenizer, root, split="test", task=task,
                                        batch_size=500)
    return result["metrics"]["knn_acc1" if task == "knn" else "acc1"]


@pytest.fixture(scope="module")
def untrained(digits_root):
    """kNN and zero-shot top-1 of the towers as every run below starts them (same config and seed)."""
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(config=DIGITS_MODEL))
    return {"knn": score(model.eval(), digits_root, "knn"),
            "zeroshot_classification": score(model, digits_root, "zeroshot_classification")}


@pytest.mark.slow
@pytest.mark.parametrize("objective,steps,task,floor,model", [
    ({"name": "supcon", "supcon": {"temperature": 0.1}}, 60, "knn", 0.6, {}),  # seen: 0.571 -> 0.619
    # without labels (the other view the only positive) neither margin loss beats the untrained tower's kNN in
    # 60 steps (seen: triplet 0.571 -> 0.569, pairwise -> 0.582); with labels they do (seen: triplet over all
    # other-class negatives 0.663, pairwise 0.617; semi-hard mining with labels: 0.535)
    ({"name": "triplet", "triplet": {"margin": 0.2, "mining": "all", "labels": True}}, 60, "knn", 0.6, {}),
    ({"name": "pairwise", "pairwise": {"margin": 1.0, "labels": True}}, 60, "knn", 0.6, {}),
    ({"name": "vse", "vse": {"violation": "sum"}}, 60, "zeroshot_classification", 0.3, {}),  # seen: 0.419
    # max violation from scratch collapses (every caption ties: zero-shot stays at chance); VSE++ warms up on
    # the sum of violations first
    ({"name": "vse", "vse": {"violation": "max", "sum_warmup_steps": 40}}, 60, "zeroshot_classification", 0.2, {}),
    ({"name": "clip", "clip": {"label_positives": True, "text_ssl_weight": 0.5}}, 60, "zeroshot_classification",
     0.3, {"text_dropout": 0.1}),
], ids=["supcon", "triplet", "pairwise", "vse_sum", "vse_max_after_sum_warmup", "clip_label_positives_simcse"])
def test_new_objectives_learn_on_the_digits(tmp_path, digits_root, untrained, objective, steps, task, floor, model):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(digits_tree(digits_root, tmp_path / "run", objective, steps, **model)))
    summary = train(load_recipe(str(path)))
    assert summary["steps"] == steps and summary["final_loss"] < summary["first_loss"]
    trained, _, _ = load_model(str(tmp_path / "run"))
    accuracy = score(trained, digits_root, task)
    assert accuracy > max(floor, untrained[task] + 0.02), (untrained[task], accuracy)  # chance: 0.1


@pytest.mark.parametrize("name", NEW_RECIPES)
def test_new_recipes_load_and_build_offline(name, tmp_path, digits_root, monkeypatch):
    monkeypatch.chdir(REPO)  # tiny recipes name ../shared/data and data/digits relative to the repository
    overrides = [f"train.output_dir={tmp_path / name}"]
    if name.endswith("resnet50") or not SHARED.is_dir() or name.startswith("digits"):
        overrides += [f"data.train=[{digits_root}]", "eval.datasets=[]", "eval.retrieval=[]"]
    recipe = load_recipe(str(REPO / "recipes" / f"{name}.yaml"), overrides)
    torch.manual_seed(0)
    objective = build_objective(recipe, build_model(recipe.model)[0])
    assert type(objective) is REGISTRY[recipe.objective.name] or recipe.objective.name == "clip"
