"""The progress bar of a run: step, test loss and ε, without slowing the steps down.

ε shown is the one recorded at the latest evaluation (computed there for ``metrics.jsonl``), so
the bar adds no accounting work between evaluations; the summary's ε is computed exactly at the
end.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from dpmicroadam.train.run import Run


class Progress:
    """A tqdm bar over a run's steps (disabled: a no-op)."""

    def __init__(self, run: Run, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.private = run.mechanism is not None
        self.show_loss = run.cfg.log_train_loss or not self.private
        self.bar = tqdm(
            total=run.total_steps,
            initial=run.state.step,
            disable=not enabled,
            desc=f"{run.cfg.optimizer} on {run.cfg.dataset}",
            file=sys.stderr,
            dynamic_ncols=True,
        )
        last = run.metrics.last()
        self.postfix: dict[str, str] = {}
        if last:
            self.evaluated(last)

    def evaluated(self, row: dict[str, Any]) -> None:
        loss = row.get("test_loss")
        self.postfix["test_loss"] = f"{loss:.3f}" if loss is not None else "n/a"
        if self.private and row.get("epsilon") is not None:
            self.postfix["ε"] = f"{row['epsilon']:.3f}"

    def stepped(self, stats: dict[str, float]) -> None:
        if self.show_loss and "train_loss" in stats:
            self.postfix["loss"] = f"{stats['train_loss']:.3f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
