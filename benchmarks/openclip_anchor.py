"""open_clip_train as the anchor: install, launch with an mmcl recipe's model config, read its logs, export.

open_clip_train's pipeline needs webdataset <= 0.2.86, while mmcl uses webdataset 1.x, so the anchor runs
in a child process with ``benchmarks/.openclip_env`` (``pip install --target ... webdataset==0.2.86``) first
on PYTHONPATH. open_clip only knows built-in model names; this module is also the child's entry point: it
registers a folder of JSON model configs (``open_clip.add_model_config``) and then calls
``open_clip_train.main.main(args)``:

    python benchmarks/openclip_anchor.py MODEL_CONFIG_DIR -- --model NAME --train-data ... (open_clip_train's flags)
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LOG_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")


def ensure_env() -> None:
    """Install webdataset 0.2.86 into benchmarks/.openclip_env with pip when it is missing."""
    if common.openclip_webdataset_version() == common.OPENCLIP_WEBDATASET:
        return
    common.say(f"installing webdataset=={common.OPENCLIP_WEBDATASET} into {common.OPENCLIP_ENV} for open_clip_train")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(common.OPENCLIP_ENV),
                    f"webdataset=={common.OPENCLIP_WEBDATASET}"], check=True)


def env(**extra: str) -> dict:
    """A child environment where `import webdataset` finds 0.2.86."""
    out = common.child_env(**extra)
    out["PYTHONPATH"] = f"{common.OPENCLIP_ENV}:{out['PYTHONPATH']}"
    return out


def write_model_config(folder: Path, name: str, model_cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(model_cfg, indent=1))
    return folder


@dataclasses.dataclass
class AnchorRun:
    """One open_clip_train run: what `mmcl train RECIPE` would do, in open_clip_train's flags."""

    model_dir: Path
    model_name: str
    data_root: Path
    samples_per_epoch: int
    epochs: int
    batch_size: int
    workers: int
    logs: Path
    name: str
    lr: float
    weight_decay: float
    warmup: int
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: Optional[float] = None
    precision: str = "fp32"
    log_every: int = 5
    seed: int = 0
    device: str = "cpu"

    def args(self) -> List[str]:
        out = ["--model", self.model_name, "--train-data", common.shard_pattern(self.data_root),
               "--train-num-samples", str(self.samples_per_epoch), "--dataset-type", "webdataset",
               "--batch-size", str(self.batch_size), "--workers", str(self.workers), "--epochs", str(self.epochs),
               "--lr", str(self.lr), "--wd", str(self.weight_decay), "--warmup", str(self.warmup),
               "--beta1", str(self.betas[0]), "--beta2", str(self.betas[1]), "--eps", str(self.eps),
               "--precision", self.precision, "--device", self.device, "--logs", str(self.logs),
               "--name", self.name, "--log-every-n-steps", str(self.log_every), "--seed", str(self.seed),
               "--save-frequency", "1", "--report-to", "none"]
        if self.grad_clip:
            out += ["--grad-clip-norm", str(self.grad_clip)]
        return out

    def command(self) -> List[str]:
        return [sys.executable, str(Path(__file__).resolve()), str(self.model_dir), "--", *self.args()]

    @property
    def run_dir(self) -> Path:
        return self.logs / self.name

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.samples_per_epoch, self.batch_size, self.workers)


def steps_per_epoch(samples: int, batch_size: int, workers: int) -> int:
    """open_clip_train's batches per epoch: ceil(samples / batch), rounded up to a multiple of workers."""
    batches = -(-samples // batch_size)
    workers = max(1, workers)
    return -(-batches // workers) * workers


def windows(log_text: str) -> List[dict]:
    """Every logged window: epoch, batches done, and the mean data and batch time over the window."""
    out = []
    for match in LOG_LINE.finditer(log_text):
        epoch, done, total, data_t, batch_t = match.groups()
        out.append({"epoch": int(epoch), "samples_done": int(done), "samples_per_epoch": int(total),
                    "data_time": float(data_t), "batch_time": float(batch_t)})
    return out


def latest_checkpoint(run: AnchorRun) -> Optional[Path]:
    found = sorted(run.run_dir.glob("checkpoints/epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return found[-1] if found else None


def checkpoint_state(checkpoint: Path) -> dict:
    """The model weights in open_clip_train's epoch_N.pt, with the keys an open_clip model has."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("module."): v.contiguous() for k, v in state.items()}


def export_checkpoint(checkpoint: Path, model_cfg: dict, out: Path) -> Path:
    """open_clip_train's epoch_N.pt -> an open_clip `local-dir:` export (the format `mmcl export` writes)."""
    import open_clip
    from safetensors.torch import save_file

    state = checkpoint_state(checkpoint)
    open_clip.CLIP(**model_cfg).load_state_dict(state)  # refuses a checkpoint that does not fit the config
    size = model_cfg["vision_cfg"].get("image_size", 224)
    preprocess = dataclasses.asdict(open_clip.transform.PreprocessCfg(size=size))
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    return out


def child_main(argv: List[str]) -> None:
    """Entry point of the child: register the config folder, then run open_clip_train."""
    import open_clip

    folder, rest = argv[0], argv[argv.index("--") + 1:]
    open_clip.add_model_config(folder)
    from open_clip_train.main import main

    main(rest)


if __name__ == "__main__":
    child_main(sys.argv[1:])
