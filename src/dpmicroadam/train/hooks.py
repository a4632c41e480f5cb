"""The extension points of a run, and the errors a run raises."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dpmicroadam.train.task import Task, default_task

if TYPE_CHECKING:  # pragma: no cover
    from dpmicroadam.train.run import Run

__all__ = ["ResumeMismatch", "RunHooks", "TrainingDiverged"]


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


class ResumeMismatch(ValueError):
    """--resume was asked with a config that differs from the saved run's."""


class RunHooks:
    """Extension points of a :class:`Run` (override what you need; the defaults do nothing)."""

    def build_task(self, run: Run) -> Task:
        """The splits and the seeded model (default: `train`'s datasets and models)."""
        return default_task(run.cfg)

    def started(self, run: Run) -> None:
        """Called once the output folder exists and ``config.json`` is written."""

    def before_release(self, run: Run) -> None:
        """Called after the batch is drawn, before it is privatized (private runs only)."""

    def after_release(self, run: Run) -> None:
        """Called when ``p.grad`` holds the released gradient, before ``optimizer.step()``."""

    def summary(self, run: Run, summary: dict[str, Any]) -> None:
        """Add fields to the summary (in place)."""
