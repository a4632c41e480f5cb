"""The training job: loop, config, checkpoints, EMA, metrics."""

from dpmicroadam.train.config import TrainConfig, resolve_config
from dpmicroadam.train.loop import Trainer, TrainingDiverged, train

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "resolve_config", "train"]
