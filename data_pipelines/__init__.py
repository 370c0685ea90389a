"""webdataset streams for mmcl: shard writers, image-text and multi-view pipelines, transforms, embedded data.

Names are imported on first use, so `mmcl data ...` starts without loading torch and open_clip.
"""
import importlib

_EXPORTS = {
    "BadSample": "decode", "check_local": "shards", "expand_urls": "shards", "split_size": "shards",
    "split_urls": "shards", "SampleSpec": "stream", "ShardStream": "stream", "SkipCounter": "stream",
    "make_loader": "stream", "clip_transform": "transforms", "view_transform": "transforms",
    "build_digits": "digits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmcl.data_pipelines.{_EXPORTS[name]}"), name)
