"""Towers (open_clip), heads, momentum copies, and loading / exporting trained models."""
from mmcl.models.factory import build_model, eval_preprocess, make_tokenizer, resolve_model_cfg
from mmcl.models.heads import ProjectionHead
from mmcl.models.loading import export_run, load_model
from mmcl.models.momentum import cosine_momentum, ema_step, ema_update, momentum_copy

__all__ = ["build_model", "eval_preprocess", "make_tokenizer", "resolve_model_cfg", "ProjectionHead",
           "export_run", "load_model", "cosine_momentum", "ema_step", "ema_update", "momentum_copy"]
