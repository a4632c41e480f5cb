"""``FastEngine``: per-example clipped gradient sums from one forward and one backward pass."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..checks import check_per_example_safe
from ..clip import clip_factors
from .capture import check_graph, check_unchanged, source_records
from .fallback import FallbackOwner
from .owner import KEEP_SMALL_ELEMENTS, KeepBudget, add_up
from .plan import build_owners

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FastEngine:
    """Clipped per-example gradient sums by layer rules and book-keeping (no per-example backward).

    One forward pass records each parameter-owning module's inputs; one backward pass of
    Σ_rows loss/K asks autograd only for the gradients of those modules' outputs (the
    parameters' own gradients are never formed and ``p.grad`` is left untouched). Each module's
    rule turns its (input, output gradient) pairs into per-example squared norms; the flat norm
    ‖g_i‖ adds them over all trainable tensors; the clipped sum Σ_i min(1, C/‖g_i‖)·g_i is then
    formed per module from the same stored tensors (Bu et al., arXiv 2210.00038). Modules
    without a rule use ``torch.func`` per module (see :mod:`.fallback`).

    Guarantee: the returned sums equal those of :class:`~dpmicroadam.privacy.per_example.VmapEngine`
    up to float rounding; each example's contribution has norm at most ``clip_norm``
    (sensitivity C under add/remove of one example). Every call checks on the autograd graph that
    no trainable parameter reaches the loss outside its module's forward, and raises otherwise.

    Assumptions the caller must meet: every layer sees batch-first tensors (row r of a layer's
    input belongs to example r // K); the model does not mix examples (no BatchNorm). The first
    call that succeeds checks the first assumption where shapes cannot: the engine's norms of the
    call's first ``verify_examples`` examples, as a batch of their own with the model in eval
    mode, against each example's own backward pass (:meth:`verify_batch_first`).

    Args:
        model: The network; its modules must not be hooked by another per-sample library.
        loss_fn: ``loss_fn(outputs, targets)`` returning per-row losses (reduction="none").
        params: Trainable parameters to compute sums for (default: every parameter of ``model``
            with ``requires_grad``, in ``model.parameters()`` order).

    Raises:
        ValueError: if parameters are tied or not in ``model``, or the model mixes examples
            (BatchNorm; see ``check_per_example_safe``).
    """

    kind = "fast"  # the name make_engine(kind=...) knows it by
    # Per-example gradient entries small conv layers may keep per call beyond the memory rule
    # (see .owner.KEEP_SMALL_ELEMENTS); 0 restores the plain rule (the tests run both).
    keep_small_elements = KEEP_SMALL_ELEMENTS
    # The first successful call's check of the batch-first layout (see verify_batch_first):
    # on, and how many examples it takes.
    verify = True
    verify_examples = 3

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: Sequence[nn.Parameter] | None = None
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_per_example_safe(model)
        self.model = model
        self.loss_fn = loss_fn
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.params = list(params)
        self._owners = build_owners(model, self.params)
        index = {id(p): j for j, p in enumerate(self.params)}
        self._slots = [[index[id(p)] for _, p in o.params] for o in self._owners]
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._wanted = frozenset(id(p) for p in self.params)  # what check_graph looks for
        self._verified = False

    def clipped_sum(
        self, inputs: torch.Tensor, targets: torch.Tensor, clip_norm: float, augmult: int = 1
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Σ_i clip(g_i) per parameter and the un-clipped per-example norms ‖g_i‖.

        Args:
            inputs: ``(b, ...)``, or ``(b, K, ...)`` when ``augmult`` = K > 1.
            targets: ``(b,)``.
            clip_norm: C > 0 (``math.inf`` for no clipping).
            augmult: K, views per example; an example's gradient is the mean over its views.

        Returns:
            ``(sums, norms)``: one tensor per entry of :attr:`params`, and a ``(b,)`` tensor.

        Raises:
            ValueError: on bad shapes or arguments, on a parameter used outside its module.
        """
        result = self._clipped_sum(inputs, targets, clip_norm, augmult)
        if self.verify and not self._verified and targets.shape[0] > 0 and self.params:
            self.verify_batch_first(
                inputs[: self.verify_examples], targets[: self.verify_examples], augmult
            )
        return result

    def verify_batch_first(
        self, inputs: torch.Tensor, targets: torch.Tensor, augmult: int = 1
    ) -> None:
        """Checks this engine's per-example norms against each example's own backward pass.

        A layer whose tensors are not batch-first (a model that calls it on each example's
        unbatched tensor, a sequence-first layout) whose sizes happen to pass the shape checks
        would otherwise give wrong norms, so wrong clipping, without a word. The model runs in
        eval mode here (dropout draws nothing; its modes are restored), and ``p.grad`` and the
        random number generators are not touched. Passing once marks the engine verified.

        Raises:
            ValueError: naming the first example (its position) whose norms differ, or the
                error the engine raised on these examples; never a norm.
        """
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            try:
                _, norms = self._clipped_sum(inputs, targets, math.inf, augmult)
            except (ValueError, RuntimeError) as err:
                raise ValueError(
                    f"the fast engine failed on {targets.shape[0]} of the examples it had just "
                    f"processed ({err}): some layer does not see batch-first tensors; use "
                    "engine='vmap'"
                ) from err
            direct = torch.stack([self._direct_norm(inputs[i], targets[i], augmult)
                                  for i in range(targets.shape[0])])  # fmt: skip
        finally:
            for m, mode in modes:
                m.training = mode
        # Relative to each norm and to the largest one (a near-zero gradient's norm is formed
        # from sums of much larger terms); a layout error is off by a few percent or more.
        # In float32 the two computations round differently, and more than 1e-4 apart on
        # WRN-16-4 (GroupNorm before the global average pool cancels badly in its backward
        # pass): 1.3e-4 for 1 of 40 initialisations (3 random CIFAR-sized examples), a
        # false alarm at a run's first step; the median was 8e-8 and the 90th percentile 4e-5.
        rtol = 3e-2 if norms.dtype in (torch.float16, torch.bfloat16) else 1e-3
        scale = direct.abs() + direct.abs().max()
        bad = ((norms - direct).abs() > rtol * scale).nonzero()
        if bad.numel():
            # No norm in the message: it is a statistic of a private example.
            raise ValueError(
                f"the fast engine's gradient norm of example {int(bad[0])} of {norms.shape[0]} "
                "differs from its own backward pass: some layer does not see batch-first "
                "tensors (a model that loops over its examples, a sequence-first layout whose "
                "length equals the batch); use engine='vmap'"
            )
        self._verified = True

    def _direct_norm(self, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
        """‖g‖ of one example from its own forward and backward pass (its K views averaged)."""
        with torch.enable_grad():
            batch = x if k > 1 else x.unsqueeze(0)
            target = y.unsqueeze(0).repeat_interleave(k, 0)  # as _flatten repeats rows
            loss = self.loss_fn(self.model(batch), target).sum() / k
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        total = sum(g.detach().double().square().sum() for g in grads if g is not None)
        return torch.as_tensor(total, dtype=torch.float64).sqrt().to(loss.dtype)

    def _clipped_sum(self, inputs, targets, clip_norm, augmult):
        b, k, flat, rep = _flatten(inputs, targets, clip_norm, augmult)
        handles = []
        budget = KeepBudget(self.keep_small_elements)
        try:
            for owner in self._owners:
                owner.views = k
                owner.batch_rows = b * k
                owner.keep_budget = budget
                handles += owner.install()
            with torch.enable_grad():
                outputs = self.model(flat)
            losses = self.loss_fn(outputs, rep)
            if losses.shape != (b * k,):
                raise ValueError(
                    f"loss_fn returned shape {tuple(losses.shape)}, expected ({b * k},): it "
                    "must return per-row losses (reduction='none')"
                )
        finally:
            for handle in handles:
                handle.remove()
        try:
            loss = losses.sum()
            return self._finish(loss / k if k > 1 else loss, b, k, clip_norm)
        finally:
            for owner in self._owners:
                owner.reset()

    def _finish(self, loss, b, k, clip_norm):
        pairs = [(o.name, r) for o in self._owners for r in o.records]
        sources = None
        if loss.requires_grad:
            sources = check_graph(loss, pairs, self._wanted, self._names)
        sq = {}  # owner index -> per-example squared norms

        def process(index: int) -> None:
            owner = self._owners[index]
            for r in owner.records:
                check_unchanged(r, owner.name)
            sq[index] = owner.sq_norms(b, k)
            # Rules keep only what their sums need: drop the stored inputs and output gradients
            # now (other lists still point at these records until the backward pass ends).
            for r in owner.records:
                r.args, r.kwargs, r.grads, r.versions, r.extra = (), {}, [], [], None
            owner.records = []

        # Output gradients of non-source records arrive in node pre-hooks during the backward
        # pass; an owner is processed as soon as all its records have them (so its stored
        # inputs can be freed before the next layer's gradient is even computed).
        flat = [(i, r) for i, o in enumerate(self._owners) for r in o.records]
        waiting = [len(o.records) for o in self._owners]
        if sources is None:
            sources = source_records(pairs) if pairs else []
        requested, handles = [], []
        for (index, r), source in zip(flat, sources):
            r.grads = [None] * len(r.edges)
            if source or len(r.edges) != 1 or isinstance(self._owners[index], FallbackOwner):
                requested.append((index, r))
                continue
            handles.append(r.edges[0].node.register_prehook(self._hook(index, r, waiting, process)))
        try:
            edges = [edge for _, r in requested for edge in r.edges]
            grads = torch.autograd.grad(loss, edges, allow_unused=True) if edges else []
        finally:
            for handle in handles:
                handle.remove()
        it = iter(grads)
        for _, r in requested:
            r.grads = [next(it) for _ in r.edges]
        del grads, it, requested, flat, pairs
        for index, owner in enumerate(self._owners):
            if owner.records and index not in sq:
                for r in owner.records:
                    r.grads = [
                        torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                        for g, (shape, dtype, device) in zip(r.grads, r.leaf_meta)
                    ]
                process(index)
        dtype = self.params[0].dtype if self.params else loss.dtype
        if sq:
            total = add_up(v if v.dtype == dtype else v.to(dtype) for v in sq.values())
        else:
            total = torch.zeros(b, dtype=dtype, device=loss.device)
        norms = total.sqrt()
        factors = clip_factors(norms, clip_norm)
        sums: list[torch.Tensor | None] = [None] * len(self.params)
        for index in sq:
            for j, value in zip(self._slots[index], self._owners[index].sums(factors)):
                if value.shape != self.params[j].shape:
                    value = value.reshape(self.params[j].shape)
                sums[j] = value.detach() if value.requires_grad else value
        for j, p in enumerate(self.params):
            if sums[j] is None:
                sums[j] = torch.zeros_like(p)
        return sums, norms.detach() if norms.requires_grad else norms

    @staticmethod
    def _hook(index, record, waiting, process):
        edge = record.edges[0]

        def hook(grad_outputs):
            g = grad_outputs[edge.output_nr]
            if g is None:
                shape, dtype, device = record.leaf_meta[0]
                g = torch.zeros(shape, dtype=dtype, device=device)
            record.grads = [g]
            waiting[index] -= 1
            if waiting[index] == 0:
                process(index)

        return hook


def _flatten(inputs, targets, clip_norm, augmult):
    # clip_norm and augmult were checked by DPConfig (dpmicroadam.privacy.clip holds the rules).
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("inputs and targets must be tensors")
    b = targets.shape[0] if targets.dim() else -1
    if inputs.dim() == 0 or inputs.shape[0] != b:
        raise ValueError(
            f"inputs has shape {tuple(inputs.shape)} and targets {tuple(targets.shape)}: both "
            "need the same leading batch dimension"
        )
    if augmult > 1:
        if inputs.dim() < 2 or inputs.shape[1] != augmult:
            raise ValueError(
                f"with augmult={augmult}, inputs must have shape (b, {augmult}, ...), got "
                f"{tuple(inputs.shape)}"
            )
        flat = inputs.reshape(b * augmult, *inputs.shape[2:])
        rep = targets.repeat_interleave(augmult, dim=0)
    else:
        flat, rep = inputs, targets
    return b, augmult, flat, rep
