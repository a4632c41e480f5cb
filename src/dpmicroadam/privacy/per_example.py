"""Per-example gradients with torch.func: the reference engine.

For a micro-batch of b examples, each with K augmented views, example i's gradient is

    g_i = ∇_θ (1/K) Σ_k ℓ(f_θ(x_{i,k}), y_i)

(the mean of its views' gradients, taken before clipping), and the clipped sum is

    S = Σ_i g_i · min(1, C / ||g_i||₂),   ||·||₂ flat over all trainable tensors together.

``vmap`` runs the per-example function once per example, so no computation can see two
examples; it materialises all b per-example gradients (b × #params floats), which is what
makes it the slow, simple ground truth the fast engine is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .checks import check_per_example_safe, find_active_randomness
from .clip import clip_factors

__all__ = ["VmapEngine", "Inputs", "LossFn", "trainable_parameters", "clip_and_sum"]

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
Inputs = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def trainable_parameters(
    model: nn.Module, params: Iterable[nn.Parameter] | None = None
) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters whose per-example gradients are computed.

    Args:
        model: The model.
        params: A subset of ``model``'s parameters, or ``None`` for every parameter with
            ``requires_grad=True`` (in ``named_parameters`` order).

    Returns:
        ``(names, params)`` in ``named_parameters`` order.

    Raises:
        ValueError: If a given parameter is not in the model, is frozen, or none is trainable.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        wanted = {id(p): p for p in params}
        chosen = [(n, p) for n, p in named if id(p) in wanted]
        known = {id(p) for _, p in chosen}
        missing = [tuple(p.shape) for i, p in wanted.items() if i not in known]
        if missing:
            raise ValueError(
                f"params holds {len(missing)} tensor(s) that are not parameters of the model "
                f"(shapes {missing}); pass parameters of this model only"
            )
        frozen = [n for n, p in chosen if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"params holds frozen parameters {frozen} (requires_grad=False); "
                "drop them from params or set requires_grad=True"
            )
    if not chosen:
        raise ValueError(
            "model has no trainable parameters (none with requires_grad=True); "
            "unfreeze the parameters to train"
        )
    return [n for n, _ in chosen], [p for _, p in chosen]


def _leaves(inputs: Inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs)


def batch_size_of(inputs: Inputs) -> int:
    """Number of examples (leading dimension) of a tensor or a dict/sequence of tensors."""
    leaves = _leaves(inputs)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError(
            "inputs must be a tensor, or a dict or sequence of tensors, got "
            f"{type(inputs).__name__}"
        )
    b = leaves[0].shape[0]
    if any(t.shape[0] != b for t in leaves):
        raise ValueError(
            f"inputs disagree on the batch size: leading dims {[t.shape[0] for t in leaves]}"
        )
    return b


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """Call ``model`` on a tensor, a dict (as keyword arguments) or a sequence (positional)."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def clip_and_sum(
    grads: Sequence[torch.Tensor], clip_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Flat-clip per-example gradients and sum them over the batch.

    Args:
        grads: Per-example gradients, one tensor ``(b, *shape)`` per parameter.
        clip_norm: C > 0; ``inf`` disables clipping.

    Returns:
        ``(sums, norms)``: ``sums[j]`` has ``grads[j].shape[1:]``; ``norms`` (b,) are the
        un-clipped flat norms.
    """
    b = grads[0].shape[0]
    # Norms in float32 at least (float64 if any gradient is): low-precision sums of squares
    # could misjudge who gets clipped.
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    sq = torch.zeros(b, dtype=dtype, device=grads[0].device)
    for g in grads:
        sq = sq + g.reshape(b, -1).to(dtype).pow(2).sum(dim=1)
    norms = sq.sqrt()
    factor = clip_factors(norms, clip_norm)
    sums = [torch.einsum("b,b...->...", factor.to(g.dtype), g) for g in grads]
    return sums, norms


def validate_views(inputs: Inputs, augmult: int) -> int:
    """Check the (b, K, ...) layout for augmult K (checked by DPConfig) and return b."""
    b = batch_size_of(inputs)
    if augmult > 1:
        bad = [tuple(t.shape) for t in _leaves(inputs) if t.dim() < 2 or t.shape[1] != augmult]
        if bad:
            raise ValueError(
                f"with augmult={augmult} inputs must have shape (b, {augmult}, ...), got {bad}"
            )
    return b


class VmapEngine:
    """Clipped sums of per-example gradients via ``torch.func.vmap`` (the reference).

    Trainable parameters (``requires_grad=True``, or the given ``params``) are differentiated;
    other parameters enter as constants and buffers are shared, un-batched, by all examples
    (so a buffer such as BERT's ``position_ids`` of shape (1, L) that the model slices and
    expands works). Inputs are a tensor, a dict of tensors (passed as keyword arguments) or
    a sequence of tensors (positional), each with a leading batch dimension.

    Randomness: vmap refuses random operations, and the result would not be reproducible
    from this library's state anyway, so active dropout is refused: put dropout modules in
    eval mode (or p=0). Buffers are never written (BatchNorm is refused by
    ``check_per_example_safe``).

    Args:
        model: The model; checked with ``check_per_example_safe``.
        loss_fn: ``loss_fn(outputs, targets)`` returning per-row losses (reduction="none").
        params: Parameters to differentiate; default all with ``requires_grad=True``.
    """

    kind = "vmap"  # the name make_engine(kind=...) knows it by

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        params: Iterable[nn.Parameter] | None = None,
    ) -> None:
        check_per_example_safe(model)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.names, self.params = trainable_parameters(model, params)

    def _constants(self) -> dict[str, torch.Tensor]:
        # Parameters not differentiated enter detached, so no autograd graph reaches them.
        chosen = set(self.names)
        return {n: p.detach() for n, p in self.model.named_parameters() if n not in chosen}

    def per_example_grads(
        self, inputs: Inputs, targets: torch.Tensor, augmult: int = 1
    ) -> list[torch.Tensor]:
        """Per-example gradients, one tensor ``(b, *param.shape)`` per trainable parameter.

        Args:
            inputs: ``(b, ...)``, or ``(b, K, ...)`` when ``augmult = K > 1``.
            targets: ``(b, ...)``, one target per example (shared by its K views).
            augmult: Views per example; example i's gradient is the mean over its views.

        Returns:
            Gradients in the order of ``self.params``.
        """
        b = validate_views(inputs, augmult)
        if b == 0:
            return [p.new_zeros((0, *p.shape)) for p in self.params]
        active = find_active_randomness(self.model)
        if active:
            listed = ", ".join(f"{p} ({c})" for p, c in active)
            raise ValueError(
                f"model has active dropout: {listed}. Per-example gradients here must be "
                "deterministic: call .eval() on these modules (or set p=0) before training."
            )
        model, loss_fn, names = self.model, self.loss_fn, self.names
        constants = self._constants()

        def example_loss(trainable: dict[str, torch.Tensor], x: Inputs, y: torch.Tensor):
            # x holds one example: (K, ...) views, or (...) without augmult.
            if augmult == 1:
                x = _map(x, lambda t: t.unsqueeze(0))
            views = y.unsqueeze(0).expand(augmult, *y.shape)
            out = functional_call(model, (trainable, constants), _as_args(x), _as_kwargs(x))
            losses = loss_fn(out, views)
            if losses.dim() != 1 or losses.shape[0] != augmult:
                raise ValueError(
                    f"loss_fn must return one loss per row (reduction='none'): for {augmult} "
                    f"row(s) it returned shape {tuple(losses.shape)}"
                )
            return losses.mean()

        trainable = {n: p.detach() for n, p in zip(names, self.params)}
        try:
            per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(trainable, inputs, targets)
        except RuntimeError as err:
            if "randomness" not in str(err):
                raise
            raise ValueError(
                "the model's forward pass draws random numbers (e.g. functional dropout with "
                "training=True); per-example gradients here must be deterministic: disable "
                "the randomness (model.eval() or p=0)"
            ) from err
        return [per_example[n] for n in names]

    def clipped_sum(
        self,
        inputs: Inputs,
        targets: torch.Tensor,
        clip_norm: float,
        augmult: int = 1,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sum over the micro-batch of flat-clipped per-example gradients.

        Args:
            inputs: ``(b, ...)``, or ``(b, K, ...)`` when ``augmult = K > 1``.
            targets: ``(b, ...)``.
            clip_norm: C > 0; ``inf`` disables clipping.
            augmult: Views per example.

        Returns:
            ``(sums, norms)``: ``sums[j]`` shaped like ``self.params[j]`` (zeros for an empty
            micro-batch), ``norms`` (b,) the un-clipped per-example norms.
        """
        grads = self.per_example_grads(inputs, targets, augmult)
        if grads[0].shape[0] == 0:
            zeros = [
                torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params
            ]
            return zeros, torch.zeros(0, device=self.params[0].device)
        return clip_and_sum(grads, clip_norm)


def _map(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    return type(x)(fn(v) for v in x) if isinstance(x, tuple) else [fn(v) for v in x]


def _as_args(x: Inputs) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, Mapping):
        return ()
    return tuple(x)


def _as_kwargs(x: Inputs) -> dict[str, torch.Tensor]:
    return dict(x) if isinstance(x, Mapping) else {}
