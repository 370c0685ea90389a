"""The training loader alone, on one core: samples/s, and open_clip's tokenizer with and without mmcl's word memo.

    python benchmarks/loader_speed.py [--recipes digits_clip_tiny flickr8k_clip_tiny] [--samples 4000] [--repeats 3]

For each recipe (its shards, image size, crop scale and context length), side by side in one process with
one torch thread, alternating, median of the repeats:
- tokenizer: microseconds per caption over the first `--samples` caption lines of the train split, in batches
  of 128, for open_clip's SimpleTokenizer and for mmcl's WordMemoTokenizer (whose ids are checked equal);
- loader: samples/s of mmcl's training stream (`ShardStream`: read, decode, crop and resize, tokenize, batch)
  over `--samples` samples of a fresh epoch, with the per-worker caption memo in front of either tokenizer.
On a CPU the loader shares the cores with the step: at S ms of step CPU per sample and L ms of loader CPU,
end to end can reach at most S / (S + L) of the in-memory step (README, Training speed).

Writes benchmarks/results/loader_speed.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 128


def recipe_setting(name: str) -> dict:
    """The recipe's train shards, image size, context length and crop scale."""
    from mmcl.config import load_tree

    path = str(common.REPO / "recipes" / f"{name}.yaml")
    tree, root = load_tree(path), common.train_root(path)
    cfg = tree["model"]["config"]
    return {"urls": [str(u) for u in sorted((root / "train").glob("*.tar"))], "size": cfg["vision_cfg"]["image_size"],
            "context": cfg["text_cfg"]["context_length"],
            "crop_scale": tuple(tree["data"].get("crop_scale", (0.9, 1.0)))}


def tokenizers(context: int) -> dict:
    import open_clip

    from mmcl.data_pipelines.tokens import WordMemoTokenizer

    return {"open_clip": lambda: open_clip.tokenizer.SimpleTokenizer(context_length=context),
            "word_memo": lambda: WordMemoTokenizer(open_clip.tokenizer.SimpleTokenizer(context_length=context))}


def captions(urls: list, count: int) -> list:
    from mmcl.data_pipelines import decode, tarstream

    lines = []
    for url in urls:
        for sample in tarstream.shard_samples(url, lambda damage: None):
            lines += decode.sample_captions(sample)
            if len(lines) >= count:
                return lines[:count]
    return lines


def tokenize_us(make, lines: list) -> float:
    tokenizer = make()  # a fresh one each time: open_clip's own BPE cache and the word memo start empty
    start = time.perf_counter()
    for i in range(0, len(lines), BATCH):
        tokenizer(lines[i:i + BATCH])
    return (time.perf_counter() - start) / len(lines) * 1e6


def loader_rate(setting: dict, make, samples: int, epoch: int) -> float:
    from mmcl.data_pipelines.stream import SampleSpec, ShardStream
    from mmcl.data_pipelines.tokens import CachedTokenizer
    from mmcl.data_pipelines.transforms import clip_transform

    spec = SampleSpec(image_transform=clip_transform(setting["size"], True, crop_scale=setting["crop_scale"]),
                      tokenizer=CachedTokenizer(make()))
    stream = ShardStream(setting["urls"], spec, BATCH, seed=0, epoch=epoch, shuffle_buffer=1000)
    start, seen = time.perf_counter(), 0
    for batch in stream:
        seen += len(batch["key"])
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def measure(name: str, setting: dict, samples: int, repeats: int) -> dict:
    import torch

    makes, lines = tokenizers(setting["context"]), captions(setting["urls"], samples)
    first, second = (make()(lines) for make in makes.values())
    if not torch.equal(first, second):
        raise SystemExit(f"{name}: the word memo's ids differ from open_clip's")
    token_us, rates = {k: [] for k in makes}, {k: [] for k in makes}
    for r in range(repeats):
        for key in (list(makes) if r % 2 == 0 else list(makes)[::-1]):
            token_us[key].append(tokenize_us(makes[key], lines))
            rates[key].append(loader_rate(setting, makes[key], samples, epoch=r))
            common.say(f"{name} {key} r{r}: {token_us[key][-1]:.1f} us/caption, {rates[key][-1]:.0f} samples/s")
    summary = {f"tokenizer_us_per_caption/{k}": common.summarize(v) for k, v in token_us.items()}
    summary.update({f"loader_samples_per_s/{k}": common.summarize(v) for k, v in rates.items()})
    return {"recipe": name, "captions": len(lines), "image_size": setting["size"], "context": setting["context"],
            "summary": summary,
            "tokenizer_speedup": statistics.median(token_us["open_clip"]) / statistics.median(token_us["word_memo"]),
            "loader_speedup": statistics.median(rates["word_memo"]) / statistics.median(rates["open_clip"])}


def table(results: list) -> str:
    rows = ["| recipe | tokenizer us/caption: open_clip | word memo | loader samples/s (one core): open_clip's "
            "tokenizer | word memo |", "|---|---|---|---|---|"]
    for res in results:
        s = res["summary"]
        med = lambda key: s[key]["median"]  # noqa: E731
        rows.append(f"| {res['recipe']} | {med('tokenizer_us_per_caption/open_clip'):.1f} | "
                    f"{med('tokenizer_us_per_caption/word_memo'):.1f} ({res['tokenizer_speedup']:.2f}x) | "
                    f"{med('loader_samples_per_s/open_clip'):.0f} | "
                    f"{med('loader_samples_per_s/word_memo'):.0f} ({res['loader_speedup']:.2f}x) |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=["digits_clip_tiny", "flickr8k_clip_tiny"])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="loader_speed.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # one loader worker's share of the machine
    machine = common.machine_info()
    results = []
    for name in args.recipes:
        setting = recipe_setting(name)
        if not setting["urls"]:
            common.say(f"{name}: no train shards (../shared/data missing?), skipped")
            continue
        results.append(measure(name, setting, args.samples, args.repeats))
    payload = {"machine": machine, "settings": vars(args), "results": results}
    common.write_json(args.out, payload)
    print(table(results))
    return payload


if __name__ == "__main__":
    main()
