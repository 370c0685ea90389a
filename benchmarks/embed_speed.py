"""`mmcl embed` images/s against the evaluation reader's feature pass, on CIFAR-10 test (10,000 images).

`mmcl embed` streams the samples through the evaluation reader (mmcl.eval.datasets + mmcl.eval.features.embed_batches)
and writes parts; the evaluation pass (mmcl.eval.features.split_features, what `mmcl eval zeroshot` runs) keeps its
features in memory. Both are timed the same way: reading, decoding, preprocessing and the model, from the first
shard opened to the last embedding (model loading excluded), and both with 2 loader workers and batch 256.
Two model sizes (untrained, fixed seed: speed does not depend on the weights): the tiny test CLIP (ViT 32 px,
width 64, 2 layers, 32-d) and flickr8k_clip_tiny's towers (ViT 64 px, width 192, 4 layers, 128-d). Each run
is a fresh process; the two sides alternate; median of 3.

    python benchmarks/embed_speed.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED_DATA, WORK, child_env, machine_info, say, summarize, write_json  # noqa: E402

MODELS = {
    "tiny (32 px, 32-d)": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                                          "head_width": 32, "mlp_ratio": 2.0},
                           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                                        "layers": 2, "mlp_ratio": 2.0}},
    "flickr8k_clip_tiny (64 px, 128-d)": {"embed_dim": 128,
                                          "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4,
                                                         "head_width": 64, "mlp_ratio": 2.0},
                                          "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128,
                                                       "heads": 4, "layers": 4, "mlp_ratio": 2.0}},
}
DATA = SHARED_DATA / "cifar10"
WORKERS, BATCH = 2, 256


def export(config: dict, folder: Path) -> str:
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.CLIP(**config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    return f"local-dir:{folder}"


def eval_reader_child(model: str) -> None:
    """The evaluation pass as `mmcl eval zeroshot` runs it; prints images/s."""
    from mmcl import load_model
    from mmcl.eval.datasets import describe_split
    from mmcl.eval.features import eval_mode, split_features

    net, preprocess, tokenizer = load_model(model, "cpu")
    info = describe_split(str(DATA), "test")
    with eval_mode(net):  # split_features applies the evaluation's thread policy itself
        features = split_features(net, preprocess, tokenizer, info, batch_size=BATCH, workers=WORKERS)
    print(json.dumps({"images": features.samples, "seconds": features.seconds}))


def run_embed(model: str) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as out:
        subprocess.run([sys.executable, "-m", "mmcl", "embed", "--model", model, "--data", str(DATA), "--split", "test",
                        "--out", f"{out}/emb", "--workers", str(WORKERS), "--batch-size", str(BATCH), "--no-progress"],
                       check=True, env=child_env(), cwd=REPO, capture_output=True)
        summary = json.loads(Path(f"{out}/emb/embed.json").read_text())
    return {"images": summary["images"], "seconds": summary["seconds"]}


def run_eval(model: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", model], check=True, env=child_env(), cwd=REPO,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return eval_reader_child(args.child)
    WORK.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine_info(), "data": "cifar10 test", "workers": WORKERS, "batch_size": BATCH, "models": {}}
    for name, config in MODELS.items():
        model = export(config, WORK / "embed_speed" / name.split()[0])
        rates = {"mmcl embed": [], "eval reader": []}
        for repeat in range(args.repeats):
            sides = [("mmcl embed", run_embed), ("eval reader", run_eval)]
            for side, run in (sides if repeat % 2 == 0 else sides[::-1]):
                measured = run(model)
                rates[side].append(measured["images"] / measured["seconds"])
                say(f"{name} {side}: {rates[side][-1]:.0f} images/s")
        row = {side: summarize(values) for side, values in rates.items()}
        row["ratio"] = row["mmcl embed"]["median"] / row["eval reader"]["median"]
        results["models"][name] = row
    write_json("embed_speed.json", results)
    print("| model | mmcl embed images/s | eval reader images/s | ratio |\n|---|---:|---:|---:|")
    for name, row in results["models"].items():
        ours, theirs = row["mmcl embed"]["median"], row["eval reader"]["median"]
        print(f"| {name} | {ours:.0f} | {theirs:.0f} | {row['ratio']:.2f} |")


if __name__ == "__main__":
    main()
