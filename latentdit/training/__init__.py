"""The DiT trainer: the loop (:func:`train`), EMA, DiT checkpoints with exact resume, data order.
The machinery it shares with VAE training lives in :mod:`latentdit.engine`."""

from latentdit.training.ema import EMA
from latentdit.training.trainer import TrainResult, train

__all__ = ["EMA", "TrainResult", "train"]
