"""The metrics log: one JSON line per evaluation (plots are drawn by ``dpmicroadam.plots``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON-lines log of evaluations.

    Args:
        path: The ``metrics.jsonl`` file.
        fresh: Start empty (a new run); else read the rows already there (a resumed run, whose
            rows past its checkpoint are dropped by :meth:`truncate` and recomputed identically).
    """

    def __init__(self, path: str | Path, fresh: bool = False) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._fresh = fresh
        if not fresh and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line torn by a kill: drop it
                        break

    def last(self) -> dict[str, Any]:
        """The latest row ({} before the first evaluation)."""
        return self.rows[-1] if self.rows else {}

    def truncate(self, step: int) -> None:
        self.rows = [r for r in self.rows if r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        tmp.replace(self.path)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        mode = "w" if self._fresh else "a"  # a new run replaces a log left by a failed one
        self._fresh = False
        with self.path.open(mode) as fh:
            fh.write(json.dumps(row) + "\n")
