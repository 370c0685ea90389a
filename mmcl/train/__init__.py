"""The Accelerate training loop, optimisation, checkpoints and logs."""
from mmcl.train.loop import TrainingError, train

__all__ = ["train", "TrainingError"]
