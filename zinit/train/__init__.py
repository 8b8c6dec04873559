"""The one trainer every recipe uses: :func:`train` a model on a :class:`Task` with a :class:`TrainConfig`."""

from .lock import OutputInUse
from .loop import NoGradient, Task, TrainConfig, TrainingDiverged, TrainResult, causal_lm_loss, train
from .schedule import lr_at, param_groups, scaled_lr
from .stop import TrainingInterrupted, stop_requested

__all__ = ["NoGradient", "OutputInUse", "Task", "TrainConfig", "TrainResult", "TrainingDiverged",
           "TrainingInterrupted", "causal_lm_loss", "lr_at", "param_groups", "scaled_lr", "stop_requested", "train"]
