"""DP-AdamBC: Adam with the noise floor removed from the second moment."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .validated import ValidatedOptimizer


def _check(name: str, value: Any, ok: bool, must: str) -> None:
    if isinstance(value, Tensor):
        raise TypeError(f"AdamBC: {name} must be a Python number, not a Tensor; pass float(value).")
    if not ok:
        raise ValueError(f"AdamBC: invalid {name}={value!r}: {must}.")


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_adambc_group(group: dict) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first bad hyper-parameter of a group."""
    lr = group["lr"]
    _check("lr", lr, _real(lr) and lr >= 0, "must be a finite number >= 0")
    betas = group["betas"]
    _check("betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 2, "must be a pair")
    for i, b in enumerate(betas):
        _check(f"betas[{i}]", b, _real(b) and 0 <= b < 1, "must lie in [0, 1)")
    gamma = group["gamma"]
    _check("gamma", gamma, _real(gamma) and gamma > 0, "must be > 0 (typically 1e-9 to 1e-8)")
    ns = group["noise_std"]
    _check(
        "noise_std",
        ns,
        _real(ns) and ns >= 0,
        "must be >= 0: sigma * C / B of the released gradient",
    )
    wd = group["weight_decay"]
    _check("weight_decay", wd, _real(wd) and wd >= 0, "must be >= 0")


class AdamBC(ValidatedOptimizer):
    r"""DP-AdamBC (Tang et al., arXiv:2312.14334): bias-corrected second moment for DP-Adam.

    The released DP gradient carries Gaussian noise of std ``noise_std`` = :math:`\sigma C/B` per
    coordinate, which inflates Adam's second moment by :math:`(\sigma C/B)^2`. AdamBC removes it:

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= v_t / (1-\beta_2^t) \\
        \theta_t &= \theta_{t-1}(1 - \eta\lambda)
            - \eta\,\frac{m_t / (1-\beta_1^t)}{\sqrt{\max(\hat v_t - \mathrm{noise\_std}^2,\ \gamma)}}

    With ``noise_std=0`` and a tiny ``gamma`` it is Adam without eps.

    Args:
        params: parameters or param-group dicts (each argument may be overridden per group).
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        gamma: floor :math:`\gamma > 0` of the corrected second moment.
        noise_std: std of the noise in the released gradient, :math:`\sigma C / B`
            (``PrivateGradient.noise_std``); a plain float, so it lives in ``param_groups``.
        weight_decay: decoupled weight decay :math:`\lambda`.
    """

    validate_group = staticmethod(validate_adambc_group)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        gamma: float = 1e-9,
        noise_std: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), gamma=gamma, noise_std=noise_std, weight_decay=weight_decay
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one step; parameters whose ``grad`` is None are skipped untouched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            validate_adambc_group(group)
            beta1, beta2 = group["betas"]
            lr, floor = group["lr"], group["gamma"]
            noise_var = float(group["noise_std"]) ** 2
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.int64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"])
                g = p.grad
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sub_(noise_var).clamp_(min=floor).sqrt_()
                if group["weight_decay"] != 0:
                    p.mul_(1 - lr * group["weight_decay"])
                p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        return loss
