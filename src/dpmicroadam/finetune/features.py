"""Frozen-backbone features for head-only fine-tuning, computed once and cached on disk.

With ``trainable="head"`` every parameter outside the head is frozen, so the head's input is a
fixed function of each example (dropout is off in the models we load). Training the head on
those features computes exactly what training the whole model would, at a fraction of the cost,
and spends no privacy: the features of an example depend on that example only, and the per-example
gradients, clipping, noise and accounting are those of the head, as before.

The cache key is a SHA-256 of the frozen weights, the head's path and the input tensor, so a
changed model, tokenizer setting or dataset never reads stale features. The cache holds features
of private data: keep it as secret as the data (default ``~/.cache/dpmicroadam/features``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["DEFAULT_CACHE_DIR", "cached_features", "head_inputs"]

DEFAULT_CACHE_DIR = Path(os.environ.get("DPMICROADAM_CACHE", "~/.cache/dpmicroadam")).expanduser()
CHUNK = 256


@torch.no_grad()
def head_inputs(
    model: nn.Module, head_path: str, x: torch.Tensor, *, desc: str = "", chunk: int = CHUNK
) -> torch.Tensor:
    """What the module at ``head_path`` receives as input when ``model`` runs on ``x``.

    Raises:
        ValueError: If the head is not called exactly once per forward, or with a tensor
            whose first dimension does not index the examples.
    """
    from tqdm.auto import tqdm

    head = dict(model.named_modules())[head_path]
    seen: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple, _kwargs: dict) -> None:
        seen.append(args[0].detach() if args else None)

    was_training = model.training
    model.eval()
    handle = head.register_forward_pre_hook(grab, with_kwargs=True)
    parts = []
    try:
        starts = range(0, x.shape[0], chunk)
        for start in tqdm(starts, desc=f"features {desc}".strip(), disable=len(starts) < 4):
            seen.clear()
            rows = x[start : start + chunk]
            model(rows)
            if len(seen) != 1 or not isinstance(seen[0], torch.Tensor):
                raise ValueError(
                    f"the head {head_path!r} was called {len(seen)} times per forward; feature "
                    "caching needs one call with a tensor input"
                )
            if seen[0].shape[0] != rows.shape[0]:
                raise ValueError(
                    f"the head {head_path!r} got an input of shape {tuple(seen[0].shape)} for "
                    f"{rows.shape[0]} examples; feature caching needs one row per example"
                )
            parts.append(seen[0].clone())
    finally:
        handle.remove()
        model.train(was_training)
    if not parts:
        return x.new_zeros((0,), dtype=torch.float32)
    return torch.cat(parts)


def _key(model: nn.Module, head_path: str, x: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(head_path.encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(head_path + "."):
            continue  # the head's own (trained) weights do not change its input
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(str(tuple(x.shape)).encode() + str(x.dtype).encode())
    h.update(x.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def cached_features(
    model: nn.Module,
    head_path: str,
    x: torch.Tensor,
    cache_dir: str | Path | None = None,
    *,
    desc: str = "",
) -> torch.Tensor:
    """:func:`head_inputs`, read from ``cache_dir`` when computed before (written atomically)."""
    if x.shape[0] == 0:
        return head_inputs(model, head_path, x, desc=desc)
    folder = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR / "features"
    path = folder / f"{_key(model, head_path, x)}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    features = head_inputs(model, head_path, x, desc=desc)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(features, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return features
