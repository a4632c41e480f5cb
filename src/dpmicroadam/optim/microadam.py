"""MicroAdam: Adam over a window of sparse gradients with compressed error feedback."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import fused
from .batched import batchable, batched_step
from .kernels import Hyper, check_state, compute_dtype, fast_step, init_state, loop_step
from .packed import MIN_PACK, pack_members, packable, packed_step
from .quantize import GROUPED_BITS, SUPPORTED_BITS
from .validated import ValidatedOptimizer

STATE_FORMAT_VERSION = 1
EF_ROUNDINGS = ("nearest", "stochastic")
_IMPLEMENTATIONS = {"fast": fast_step, "fused": fast_step, "compiled": fast_step, "loop": loop_step}
IMPLEMENTATIONS = tuple(_IMPLEMENTATIONS)  # the names implementation= takes


def _bad(name: str, value: Any, must: str) -> ValueError:
    return ValueError(f"MicroAdam: invalid {name}={value!r}: {must}.")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_group(group: dict) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first bad hyper-parameter of a param group."""
    for key in ("lr", "eps", "weight_decay", "density"):
        if isinstance(group[key], Tensor):
            raise TypeError(
                f"MicroAdam: {key} must be a Python number, got a Tensor; tensors in param_groups "
                "are not supported (pass float(value))."
            )
    if not _is_real(group["lr"]) or group["lr"] < 0:
        raise _bad("lr", group["lr"], "must be a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise _bad("betas", betas, "must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if not _is_real(b) or not 0.0 <= b < 1.0:
            raise _bad(f"betas[{i}]", b, "must lie in [0, 1)")
    if not _is_real(group["eps"]) or group["eps"] <= 0:
        raise _bad("eps", group["eps"], "must be > 0 (eps sits outside the square root)")
    if not _is_real(group["weight_decay"]) or group["weight_decay"] < 0:
        raise _bad("weight_decay", group["weight_decay"], "must be >= 0")
    ws = group["window_size"]
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise _bad("window_size", ws, "must be an integer >= 1")
    if not _is_real(group["density"]) or not 0.0 < group["density"] <= 1.0:
        raise _bad("density", group["density"], "must lie in (0, 1]; use 1.0 for dense updates")
    if group["ef_bits"] not in (None, *SUPPORTED_BITS) or isinstance(group["ef_bits"], bool):
        raise _bad(
            "ef_bits", group["ef_bits"], f"must be None (exact fp32) or one of {SUPPORTED_BITS}"
        )
    qb = group["quant_bucket_size"]
    if not isinstance(qb, int) or isinstance(qb, bool) or qb < 1:
        raise _bad("quant_bucket_size", qb, "must be an integer >= 1")
    tb = group["topk_block_size"]
    if (
        tb != "auto"
        and tb is not None
        and (not isinstance(tb, int) or isinstance(tb, bool) or tb < 1)
    ):
        raise _bad("topk_block_size", tb, "must be 'auto', None (whole tensor) or an integer >= 1")
    vd = group["value_dtype"]
    if not isinstance(vd, torch.dtype) or not vd.is_floating_point:
        raise _bad("value_dtype", vd, "must be a floating torch.dtype such as torch.bfloat16")
    rounding = group.get("ef_rounding", "nearest")  # absent from state dicts saved before it
    if rounding not in EF_ROUNDINGS:
        raise _bad("ef_rounding", rounding, f"must be one of {EF_ROUNDINGS}")
    if rounding == "stochastic" and group["ef_bits"] is None:
        raise _bad(
            "ef_rounding",
            rounding,
            "needs a quantized error feedback (ef_bits=4 or 8, or the 5- and 6-bit extensions); "
            "exact error feedback is not rounded, use ef_rounding='nearest'",
        )
    if group["implementation"] not in _IMPLEMENTATIONS:
        raise _bad(
            "implementation", group["implementation"], f"must be one of {sorted(_IMPLEMENTATIONS)}"
        )


class ParamName:
    """``parameter i of param group g (shape ...)``, formatted only when an error needs it."""

    __slots__ = ("index", "group", "shape")

    def __init__(self, index: int, group: int, shape: torch.Size) -> None:
        self.index, self.group, self.shape = index, group, shape

    def __str__(self) -> str:
        return f"parameter {self.index} of param group {self.group} (shape {tuple(self.shape)})"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class MicroAdam(ValidatedOptimizer):
    r"""MicroAdam (Modoranu et al., NeurIPS 2024, arXiv:2405.15593), exactly as SPEC section 1.

    Per tensor, with gradient :math:`g` at global step :math:`t` and window length :math:`m`:

    .. math::

        a &= g + \mathrm{dequant}(e) \\
        \mathcal{S} &= \mathrm{topk}_{|a|}(a)\ \text{per block},\quad
            (I, V)_{(t-1) \bmod m} \leftarrow (\mathcal{S}, a_{\mathcal{S}}) \\
        e &\leftarrow \mathrm{quant}(a \text{ with } a_{\mathcal{S}} = 0) \\
        M &= \textstyle\sum_i \beta_1^{r_i} V_i,\quad S = \sum_i \beta_2^{r_i} V_i^2
            \quad (\text{scattered to } I_i,\ r_i = (t-1-i) \bmod m) \\
        \theta &\leftarrow \theta (1 - \eta\lambda)
            - \eta\,\frac{c_1 M}{\sqrt{c_2 S} + \epsilon},\quad
            c_1 = \tfrac{1-\beta_1}{1-\beta_1^t},\ c_2 = \tfrac{1-\beta_2}{1-\beta_2^t}

    Coordinates absent from the window do not move (apart from weight decay).

    Args:
        params: iterable of parameters or param-group dicts; every argument below may be
            overridden per group (e.g. ``density=1.0`` for 1-D tensors).
        lr: learning rate :math:`\eta` (does not transfer from Adam; see SPEC).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: added outside the square root, > 0.
        weight_decay: decoupled weight decay :math:`\lambda`.
        window_size: :math:`m`, number of sparse gradients kept.
        density: fraction of entries kept per block, in (0, 1].
        ef_bits: ``4`` (SPEC), ``5``, ``6`` or ``8`` for the quantized error feedback, ``None``
            for exact fp32. 5 and 6 bits are stepped one tensor at a time (not batched or packed).
        quant_bucket_size: entries per quantization bucket (each keeps its min and max).
        topk_block_size: ``"auto"`` (blocks of 32768, int16 indices), an integer, or ``None`` for
            top-k over each whole tensor.
        value_dtype: dtype of the stored window values.
        ef_rounding: ``"nearest"`` (SPEC) or ``"stochastic"``: the quantized error feedback is
            rounded up or down at random, unbiased (see :mod:`dpmicroadam.optim.quantize`).
            Rounding to nearest loses every increment under half a quantization step, which
            at low density over long runs starves most coordinates (docs/results.md). The
            draws come from one generator per device seeded with ``rounding_seed``, stepped
            tensor by tensor; their state is in :meth:`state_dict`. Stochastic tensors are
            stepped one at a time (not batched or packed), in parameter order.
        rounding_seed: seed of the stochastic rounding's generators. The rounding only
            post-processes released gradients, so it needs no secrecy.
        implementation: ``"fast"`` (vectorized; large tensors are stepped together, see
            :mod:`dpmicroadam.optim.packed`), ``"compiled"`` (the same with the large tensors'
            elementwise stages built by ``torch.compile`` on the first step, seconds; falls
            back to ``"fast"`` with one warning if compiling fails, see
            :mod:`dpmicroadam.optim.compiled`), ``"fused"`` (CPU, 4-bit error feedback: every
            eligible tensor stepped by two C++ loops over the top-k blocks, built on the
            first step, ~30 s once per machine; falls back to ``"fast"`` with one warning if
            building fails, see :mod:`dpmicroadam.optim.fused`) or ``"loop"`` (the ground
            truth, slow).

    State is lazily created at a parameter's first step; see
    :mod:`dpmicroadam.optim.kernels` for its layout and :func:`state_bytes` for its size.
    """

    validate_group = staticmethod(validate_group)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        window_size: int = 10,
        density: float = 0.01,
        ef_bits: int | None = 4,
        quant_bucket_size: int = 1024,
        topk_block_size: int | str | None = "auto",
        value_dtype: torch.dtype = torch.bfloat16,
        implementation: str = "fast",
        ef_rounding: str = "nearest",
        rounding_seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            window_size=window_size,
            density=density,
            ef_bits=ef_bits,
            quant_bucket_size=quant_bucket_size,
            topk_block_size=topk_block_size,
            value_dtype=value_dtype,
            implementation=implementation,
            ef_rounding=ef_rounding,
        )
        if not isinstance(rounding_seed, int) or isinstance(rounding_seed, bool):
            raise _bad("rounding_seed", rounding_seed, "must be an integer")
        self.rounding_seed = rounding_seed
        self._rounding_rngs: dict[str, torch.Generator] = {}
        super().__init__(params, defaults)

    def _plan_step(self) -> tuple[list[tuple], list[tuple], list[tuple], list[tuple]]:
        """Sort the tensors with a gradient into single steps, batches and packs; nothing is
        mutated.

        Returns ``(singles, batches, packs, checks)``: ``(name, p, grad, group, hp, layout)`` per
        single tensor; ``(names, params, flat_grad, hp)`` per batch of small tensors;
        ``(names, params, hp)`` per pack of large tensors; and the ``(names, numels, grad)``
        whose finiteness must hold before any state changes.
        """
        singles, batches, packs, checks = [], [], [], []
        for gi, group in enumerate(self.param_groups):
            validate_group(group)
            hp = Hyper.from_group(group)
            small: dict[tuple, list[tuple[str, Tensor]]] = {}
            large: dict[tuple, list[tuple[str, Tensor]]] = {}
            joined: dict[tuple, list[tuple[str, Tensor]]] = {}  # implementation="fused"
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = ParamName(pi, gi, p.shape)
                if p.grad.is_sparse:
                    raise TypeError(f"MicroAdam: {name} has a sparse gradient; use a dense one.")
                layout = hp.layout(p.numel())
                state = self.state.get(p)
                if state:
                    check_state(state, p, hp, layout, name)
                key = (p.device, p.dtype, int(state["step"]) if state else 0)
                fast = group["implementation"] != "loop" and p.grad.is_contiguous()
                # one tensor at a time: the dither is drawn per tensor, and 5/6-bit codes are
                # packed by quantize_ only (not by the batched or packed steps)
                fast = fast and hp.ef_rounding == "nearest" and hp.ef_bits not in GROUPED_BITS
                if fast and group["implementation"] == "fused" and fused.eligible(p, hp, layout):
                    joined.setdefault(key, []).append((name, p))
                elif fast and batchable(p, hp):
                    small.setdefault(key, []).append((name, p))
                elif fast and packable(p, hp):
                    large.setdefault(key, []).append((name, p))
                else:
                    singles.append((name, p, p.grad, group, hp, layout))
                    checks.append(([name], [p.numel()], p.grad))
            for members in joined.values():  # their finiteness is checked by fused.front
                packs.append(([m[0] for m in members], [m[1] for m in members], hp, "fused"))
            for members in small.values():
                names, params = [m[0] for m in members], [m[1] for m in members]
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                batches.append((names, params, flat, hp))
                checks.append((names, [p.numel() for p in params], flat))
            for members in large.values():
                keep = pack_members([p.numel() for _, p in members], hp.topk_block_size)
                if sum(keep) < MIN_PACK:
                    keep = [False] * len(members)
                singles.extend(
                    (name, p, p.grad, group, hp, hp.layout(p.numel()))
                    for (name, p), k in zip(members, keep)
                    if not k
                )
                if any(keep):
                    how = "compiled" if group["implementation"] == "compiled" else "eager"
                    chosen = [m for m, k in zip(members, keep) if k]
                    packs.append(([m[0] for m in chosen], [m[1] for m in chosen], hp, how))
                checks.extend(([name], [p.numel()], p.grad) for name, p in members)
        return singles, batches, packs, checks

    @staticmethod
    def _check_finite(checks: list[tuple[list[str], list[int], Tensor]]) -> None:
        """Raise naming the first tensor whose gradient holds NaN or inf.

        A sum is NaN or inf whenever a term is, so one cheap sum per tensor screens them; a
        non-finite sum of finite terms (an overflow) is then ruled out exactly before raising.
        """
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, _, g) in enumerate(checks):
            by_device.setdefault(g.device, []).append(i)
        for ids in by_device.values():
            sums = torch.stack([checks[i][2].sum() for i in ids])
            if bool(torch.isfinite(sums).all()):
                continue
            ok = torch.stack([torch.isfinite(checks[i][2]).all() for i in ids])
            if bool(ok.all()):
                continue
            names, numels, grad = checks[ids[int((~ok).nonzero()[0])]]
            first_bad = int((~torch.isfinite(grad.reshape(-1))).nonzero()[0])
            member = int(torch.searchsorted(torch.tensor(numels).cumsum(0), first_bad, right=True))
            raise ValueError(
                f"MicroAdam: the gradient of {names[member]} contains NaN or inf; no state was "
                "changed. Skip this step (e.g. a GradScaler does) or find the overflow."
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one optimizer step; parameters whose ``grad`` is None are skipped untouched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        singles, batches, packs, checks = self._plan_step()
        # Nothing changes state before every gradient is known finite: the fused steps' first
        # halves are pure and check their own tensors.
        fronts = [
            fused.front(names, params, self._states(params, hp, store=False), hp)
            for names, params, hp, how in packs
            if how == "fused"
        ]
        if checks:
            self._check_finite(checks)
        for name, p, grad, group, hp, layout in singles:
            state = self.state[p]
            if not state:
                state.update(init_state(p, hp, layout))
            step = _IMPLEMENTATIONS[group["implementation"]]
            step(p, grad, state, hp, layout, name, self._dither(p, hp))
        for names, params, flat, hp in batches:
            batched_step(names, params, flat, self._states(params, hp), hp)
        for names, params, hp, how in packs:
            if how != "fused":
                packed_step(names, params, self._states(params, hp), hp, how == "compiled")
        for f in fronts:
            fused.finish(f)
            for p, st in zip(f.params, f.states):
                self.state[p] = st
        return loss

    def _rounding_rng(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._rounding_rngs:
            self._rounding_rngs[key] = torch.Generator(device=device).manual_seed(
                self.rounding_seed
            )
        return self._rounding_rngs[key]

    def _dither(self, p: Tensor, hp: Hyper) -> Tensor | None:
        """One uniform draw per entry of ``p`` for stochastic rounding, else ``None``."""
        if hp.ef_rounding != "stochastic":
            return None
        gen = self._rounding_rng(p.device)
        return torch.rand(p.numel(), generator=gen, device=p.device, dtype=compute_dtype(p))

    def _states(
        self, params: list[Tensor], hp: Hyper, store: bool = True
    ) -> list[dict[str, Tensor]]:
        """The states of ``params``, created at their first step (and not yet kept in
        ``self.state`` unless ``store``)."""
        states = []
        for p in params:
            state = self.state.get(p)
            if not state:
                state = init_state(p, hp, hp.layout(p.numel()))
                if store:
                    self.state[p] = state
            states.append(state)
        return states

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus ``format_version``."""
        sd = super().state_dict()
        sd["format_version"] = STATE_FORMAT_VERSION
        if self._rounding_rngs:
            sd["rounding_rngs"] = {k: g.get_state() for k, g in self._rounding_rngs.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`, keeping every state tensor's dtype.

        torch's loader casts floating state to the parameter's dtype; MicroAdam's bf16 window
        values and fp32 quantization ranges must keep theirs, so they are restored afterwards.
        """
        version = state_dict.get("format_version")
        if version != STATE_FORMAT_VERSION:
            raise ValueError(
                f"MicroAdam: state_dict format_version={version!r} is not supported (expected "
                f"{STATE_FORMAT_VERSION}); load a dict saved by this version of MicroAdam.state_dict()."
            )
        saved = {key: dict(value) for key, value in state_dict["state"].items()}
        rngs = state_dict.get("rounding_rngs", {})
        super().load_state_dict(
            {k: v for k, v in state_dict.items() if k not in ("format_version", "rounding_rngs")}
        )
        self._rounding_rngs = {}
        for key, rng_state in rngs.items():
            self._rounding_rng(torch.device(key)).set_state(rng_state)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            validate_group(group)
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in saved.get(pid, {}).items():
                    device = "cpu" if key == "step" else p.device
                    self.state[p][key] = value.to(device=device, copy=True)
