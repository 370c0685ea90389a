"""What every objective without negatives shares: a watch on collapse.

Without negatives nothing in the loss forbids the trivial solution (every image mapped to one vector);
predictors, stop-gradients, variance terms and equipartitioned codes avoid it in practice, but a bad
setting (learning rate, momentum, weights) can still collapse a run. The objective keeps the last batch of
its projections; at each log record the trainer logs `collapse/std` (mean per-dimension std of the
L2-normalised outputs: 0 when collapsed, about 1 / sqrt(dim) when spread), `collapse/effective_rank` and
`collapse/uniformity`, and warns once when the std falls below `COLLAPSE_FRACTION` of 1 / sqrt(dim).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from mmcl.losses.geometry import collapse_metrics, dimension_std
from mmcl.objectives.simclr import ViewObjective

COLLAPSE_FRACTION = 0.1  # warn below this fraction of the spread-out std, 1 / sqrt(dim)


class WatchedViewObjective(ViewObjective):
    """A ViewObjective that watches its projections for collapse (`watch` them in `losses`)."""

    watched: Optional[torch.Tensor] = None

    def watch(self, outputs: torch.Tensor) -> None:
        if self.training:
            self.watched = outputs.detach()

    def collapse(self) -> Dict[str, float]:
        if self.watched is None:
            return {}
        return {f"collapse/{key}": value for key, value in collapse_metrics(self.watched).items()}

    def log_values(self) -> Dict[str, float]:
        return {**super().log_values(), **self.collapse()}

    def warning(self) -> Optional[str]:
        if self.watched is None:
            return None
        std, dim = float(dimension_std(self.watched.float())), self.watched.shape[1]
        floor = COLLAPSE_FRACTION / math.sqrt(dim)
        if std >= floor:
            return None
        return (f"the outputs are collapsing: their per-dimension std is {std:.2e}, below {floor:.2e} "
                f"({COLLAPSE_FRACTION:g} / sqrt({dim})); check the learning rate, momentum and loss weights")
