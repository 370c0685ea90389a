"""Compiled towers, bf16 on a CPU, the scale-out switches of a recipe, and the GPU check's dry run.

The two-process checks (overlapped gradient all-reduce, FSDP) are in tests/test_train_distributed.py.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env
from mmcl.config import ConfigError, ModelConfig, load_recipe
from mmcl.models import factory
from mmcl.trainer import fsdp
from mmcl.trainer.gradsync import GradSync

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def image_features_and_grads(model, images):
    model.zero_grad(set_to_none=True)
    features = model.encode_image(images, normalize=True)
    features.pow(3).sum().backward()
    return features.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_towers_give_the_eager_features_and_gradients():
    """The image tower only (inductor compiles lazily, at the first call: the text tower's compile would double
    the test's time for the same code path; a training step with both compiled runs in the GPU check's dry run)."""
    torch.manual_seed(0)
    eager, _ = factory.build_model(ModelConfig(config=TINY))
    compiled = copy.deepcopy(eager)
    factory.compile_towers(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and exports unchanged
    assert compiled.visual._compiled_call_impl is not None and compiled.transformer._compiled_call_impl is not None
    images = torch.randn(4, 3, 16, 16)
    (a, grads_a), (b, grads_b) = image_features_and_grads(eager, images), image_features_and_grads(compiled, images)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_on_a_cpu_runs_the_towers_under_autocast(tiny_recipe, fresh_accelerate_state):
    from mmcl.trainer import setup as S

    recipe = load_recipe(str(tiny_recipe({"train.precision": "bf16"})))
    accelerator = S.make_accelerator(recipe)
    assert accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16"
    layer = torch.nn.Linear(8, 8)
    with accelerator.autocast():
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16  # the matmuls run in bf16 (oneDNN)
    assert layer.weight.dtype == torch.float32  # the weights and AdamW stay in fp32


@pytest.mark.parametrize("changes, message", [
    (["train.fsdp=true", "train.precision=fp16"], "train.fsdp: fp16 is not supported with FSDP"),
    (["train.fsdp=true", "model.compile=true"], "model.compile: not supported together with train.fsdp"),
    (["train.grad_bucket_mb=0"], "train.grad_bucket_mb: must be > 0"),
    (["train.grad_sync=ddp"], "train.grad_sync: must be one of overlap, after_backward"),
])
def test_scale_out_switches_are_checked_before_any_work(tiny_recipe, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(str(tiny_recipe()), changes)


def test_accelerate_launch_use_fsdp_turns_fsdp_on(tiny_recipe, monkeypatch):
    recipe = load_recipe(str(tiny_recipe()))
    assert not fsdp.requested(recipe)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` exports
    assert fsdp.requested(recipe)
    with pytest.raises(ConfigError, match="fp16 is not supported with FSDP"):
        load_recipe(str(tiny_recipe()), ["train.precision=fp16"])


def test_one_process_sync_is_a_no_op_and_leaves_gradients_alone():
    param = torch.nn.Parameter(torch.ones(3))
    sync = GradSync([param], "overlap")
    assert sync.hooks == []  # nothing to overlap with one process: no hooks on the backward pass
    sync.arm()
    (param * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    sync.finish()
    assert param.grad.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_variant_and_both_syncs(tmp_path):
    """benchmarks/gpu_check.py --dry-run on a CPU: the step variants (bf16, compiled, fp32) and, with two gloo
    processes, overlapped vs after-backward all-reduce and FSDP."""
    out = tmp_path / "gpu_check_dry_run.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--only", "in_memory",
               "scale_out", "--out", str(out)]
    env = subprocess_env(MMCL_BENCH_WORK=str(tmp_path / "work"))  # its scratch recipes and runs: not in the checkout
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    variants = report["in_memory"]["variants"]
    assert set(variants) == {"bf16", "bf16_compile", "fp32"}
    assert all(v["samples_per_s"] > 0 and v["world"] == 1 for v in variants.values())
    assert variants["bf16"]["flops_per_sample"] > 1e6  # counted once; MFU needs a peak, none on a CPU
    scale = report["scale_out"]["variants"]
    assert all(v["world"] == 2 and v["samples_per_s"] > 0 for v in scale.values())
    assert scale["overlap"]["sent_in_backward"] >= 1 and scale["after_backward"]["sent_in_backward"] == 0
    assert all(v["achieved_tflops"] > 0 for v in list(variants.values()) + list(scale.values()))
