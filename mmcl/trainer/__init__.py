"""The Accelerate training loop, optimisation, checkpoints and logs."""
from mmcl.trainer.loop import TrainingError, train

__all__ = ["train", "TrainingError"]
