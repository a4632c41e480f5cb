"""The clipped-sum engine contract and the factory that picks an implementation."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .per_example import Inputs, LossFn, VmapEngine

__all__ = ["ClippedSumEngine", "make_engine", "ENGINE_KINDS"]

ENGINE_KINDS = ("auto", "vmap", "fast")


@runtime_checkable
class ClippedSumEngine(Protocol):
    """Computes Σ_i clip(g_i) over one micro-batch.

    ``params`` lists the differentiated parameters; ``clipped_sum`` returns ``(sums, norms)``
    where ``sums[j]`` is the sum over the micro-batch's examples of the flat-clipped
    per-example gradient of ``params[j]`` (example gradient = mean over its K views, before
    clipping) and ``norms`` (b,) are the un-clipped per-example norms. Since each example
    enters the sum through one term of norm at most C, adding or removing an example moves
    the sum by at most C in L2 norm.
    """

    params: list[nn.Parameter]

    def clipped_sum(
        self,
        inputs: Inputs,
        targets: torch.Tensor,
        clip_norm: float,
        augmult: int = 1,
    ) -> tuple[list[torch.Tensor], torch.Tensor]: ...


def _fast_module():
    """Import ``dpmicroadam.privacy.fast`` if it is there, else return None."""
    try:
        return importlib.import_module(f"{__package__}.fast")
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.startswith(f"{__package__}.fast"):
            return None
        raise


def make_engine(
    model: nn.Module,
    loss_fn: LossFn,
    kind: str = "auto",
    params: Iterable[nn.Parameter] | None = None,
) -> ClippedSumEngine:
    """Build the engine that computes clipped per-example gradient sums.

    Args:
        model: The model (each engine refuses unsafe models, e.g. BatchNorm, when built).
        loss_fn: ``loss_fn(outputs, targets)`` returning per-row losses (reduction="none").
        kind: ``"vmap"`` (torch.func reference), ``"fast"`` (hooks engine, if installed), or
            ``"auto"``: fast when its module is present and ``fast.supports(model)`` says
            yes, otherwise vmap.
        params: Parameters to differentiate; default all with ``requires_grad=True``.

    Returns:
        An object following ``ClippedSumEngine``.

    Raises:
        ValueError: If ``kind`` is unknown, ``"fast"`` is asked for but not available, or the
            model mixes examples (e.g. BatchNorm).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"kind must be one of {ENGINE_KINDS}, got {kind!r}")
    if kind == "vmap":
        return VmapEngine(model, loss_fn, params)
    fast = _fast_module()
    if kind == "fast":
        if fast is None or not hasattr(fast, "FastEngine"):
            raise ValueError(
                "kind='fast' asked for, but the fast hooks engine (dpmicroadam.privacy.fast) "
                "is not available in this installation; use kind='vmap' or 'auto'"
            )
        return fast.FastEngine(model, loss_fn, params)
    supports = getattr(fast, "supports", None) if fast is not None else None
    if supports is not None and hasattr(fast, "FastEngine") and supports(model):
        return fast.FastEngine(model, loss_fn, params)
    return VmapEngine(model, loss_fn, params)
