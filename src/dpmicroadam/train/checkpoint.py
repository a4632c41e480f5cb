"""Atomic checkpoints that load without executing code."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"


class OutputError(OSError):
    """An output could not be written (full disk, read-only folder, ...); nothing half-written
    is left behind."""


def _atomic_write(path: Path, write: Any) -> None:
    """``write(fh)`` into ``path.tmp``, fsync, rename over ``path``; on failure remove the tmp."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            err.errno, f"cannot write {str(path)!r}: {err.strerror or err}; the previous "
            "version (if any) is intact"
        ) from err  # fmt: skip
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder we cannot open for fsync
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous checkpoint intact.

    The checkpoint holds the noise and sampling generators' states: keep it as secret as the data.
    """
    payload = {"format_version": FORMAT_VERSION, **state}
    _atomic_write(Path(path), lambda fh: torch.save(payload, fh))


def write_json(path: str | Path, value: Any) -> None:
    """Write strict JSON (no NaN or Infinity: they become null) atomically."""
    text = json.dumps(strict_json(value), indent=2, allow_nan=False)
    _atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def strict_json(value: Any) -> Any:
    """A copy with NaN and ±inf replaced by None (strict JSON parsers reject them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def make_out_dir(out: Path) -> None:
    """Create the output folder, or say in one line why it cannot be."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"--out {str(out)!r} cannot be written ({err.strerror or err}); choose a writable "
            "folder"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code is ever run).

    Raises:
        ValueError: If the file is empty, truncated, not a checkpoint, or of another format
            version (the message says what to do; never to load it unsafely).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many kinds for damaged files
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(
            f"checkpoint {str(path)!r} ({size} bytes) is damaged or not a dpmicroadam checkpoint "
            f"({type(err).__name__}); it cannot be resumed. Move it away and start a new run "
            "(the privacy budget it spent is not recoverable)"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} is not a dpmicroadam checkpoint")
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
    if cfg.resume and not out.is_dir():
        raise ValueError(
            f"--resume: {str(out)!r} does not exist, so there is nothing to resume; check --out, "
            "or drop --resume to start a new run"
        )
    if cfg.resume and not ckpt.exists():
        import sys

        print(
            f"note: --resume: {str(out)!r} holds no checkpoint yet; starting from step 0",
            file=sys.stderr,
        )
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
