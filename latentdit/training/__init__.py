"""Training: the loop (:func:`train`), EMA, checkpoints with exact resume, data order."""

from latentdit.training.checkpoint import CheckpointManager, resolve_resume
from latentdit.training.ema import EMA
from latentdit.training.trainer import TrainResult, check_batch_layout, enable_tf32, train

__all__ = ["CheckpointManager", "EMA", "TrainResult", "check_batch_layout", "enable_tf32", "resolve_resume",
           "train"]
