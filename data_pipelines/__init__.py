"""webdataset streams for mmcl: shard writers, image-text and multi-view pipelines, transforms, embedded data."""
from data_pipelines.decode import BadSample
from data_pipelines.shards import check_local, expand_urls, split_size, split_urls
from data_pipelines.stream import SampleSpec, ShardStream, SkipCounter, make_loader
from data_pipelines.transforms import clip_transform, view_transform

__all__ = ["BadSample", "check_local", "expand_urls", "split_size", "split_urls", "SampleSpec", "ShardStream",
           "SkipCounter", "make_loader", "clip_transform", "view_transform"]
