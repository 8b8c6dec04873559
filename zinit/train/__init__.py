"""The one trainer every recipe uses: :func:`train` a model on a :class:`Task` with a :class:`TrainConfig`."""

from .loop import Task, TrainConfig, TrainingDiverged, TrainResult, causal_lm_loss, train
from .schedule import lr_at, param_groups, scaled_lr

__all__ = ["Task", "TrainConfig", "TrainResult", "TrainingDiverged", "causal_lm_loss", "lr_at", "param_groups",
           "scaled_lr", "train"]
