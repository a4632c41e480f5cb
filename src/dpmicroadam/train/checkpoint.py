"""Atomic checkpoints that load without executing code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save({"format_version": FORMAT_VERSION, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code is ever run)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {version!r}; this dpmicroadam reads "
            f"version {FORMAT_VERSION}"
        )
    return state


def check_resume(cfg: Any, out: Path) -> None:
    """Refuse to overwrite a run without ``--resume``, or to resume with a changed config.

    Raises:
        ValueError: ``out`` holds a checkpoint and ``cfg.resume`` is off.
        ResumeMismatch: The saved ``config.json`` differs in a field that shapes the run.
    """
    from dpmicroadam.train.hooks import ResumeMismatch

    saved, ckpt = out / "config.json", out / CHECKPOINT
    if not cfg.resume:
        if ckpt.exists():
            raise ValueError(
                f"{str(out)!r} already holds a run; pass --resume to continue it or choose "
                "another --out"
            )
        return
    if saved.exists():
        old = json.loads(saved.read_text())
        new = cfg.comparable()
        diff = sorted(k for k in new if k in old and old[k] != new[k])
        if diff:
            details = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in diff)
            raise ResumeMismatch(
                f"--resume refuses a changed config ({details}); rerun with the saved "
                f"settings in {str(saved)!r} or start a new run with another --out"
            )
