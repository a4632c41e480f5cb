"""The training layer: the run (loop, state, task), its config, checkpoints, EMA and metrics."""

from dpmicroadam.train.config import TrainConfig, resolve_config
from dpmicroadam.train.run import (
    CHECKPOINT,
    ResumeMismatch,
    Run,
    RunHooks,
    TrainingDiverged,
    train,
)
from dpmicroadam.train.state import RunState
from dpmicroadam.train.task import Task

__all__ = [
    "CHECKPOINT",
    "ResumeMismatch",
    "Run",
    "RunHooks",
    "RunState",
    "Task",
    "TrainConfig",
    "TrainingDiverged",
    "resolve_config",
    "train",
]
