"""mmcl: contrastive pretraining of image and text towers (CLIP, SigLIP, ...) and image towers (SimCLR, MoCo,
BYOL, ...), with zero-shot, retrieval and probe evaluation and semantic search.

The public API is mmcl.train, mmcl.evaluate, mmcl.load_model, mmcl.export and mmcl.build_shards (mmcl/api.py).
"""
import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _SourceFolders(importlib.abc.MetaPathFinder):
    """Finds mmcl.eval and mmcl.data_pipelines in the repository's top-level eval/ and data_pipelines/."""

    def __init__(self, folders):
        self.folders = folders

    def find_spec(self, name, path=None, target=None):
        folder = self.folders.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _use_source_folders() -> None:
    """A wheel installs eval/ and data_pipelines/ inside mmcl/ (pyproject's package-dir); in a source checkout
    or an editable install they sit beside it. Either way they import as mmcl.eval and mmcl.data_pipelines."""
    here = Path(__file__).resolve().parent
    folders = {f"mmcl.{name}": here.parent / name for name in ("eval", "data_pipelines")
               if not (here / name).is_dir() and (here.parent / name / "__init__.py").is_file()}
    if folders:
        sys.meta_path.insert(0, _SourceFolders(folders))


_use_source_folders()

from mmcl.api import build_shards, evaluate, export, load_model, train  # noqa: E402

__all__ = ["train", "evaluate", "load_model", "export", "build_shards", "__version__"]
