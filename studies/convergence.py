"""Convergence on a smooth non-convex problem: min_{t ≤ T} ‖∇f(θ_t)‖² against T at fixed σ.

The seed claims DP-MicroAdam converges at O(1/√T) like DP-SGD. Here f is logistic regression with
the smooth non-convex regularizer λ Σ_j θ_j² / (1 + θ_j²) on synthetic data; each run takes T
private steps (Poisson sampling, clipping C, noise σ fixed, the same `DPMechanism` as `train`)
with the step size lr0/√T that the O(1/√T) analysis uses, and records the smallest full-batch
gradient norm² seen. The fitted log–log slope of that minimum against T is printed and plotted.

Run: python studies/convergence.py            (≈ 2 minutes on 2 cores)
Writes results/convergence.csv and results/convergence.png.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpmicroadam import DPConfig, DPMechanism, MicroAdam

N, D, LAM = 2000, 20, 0.1


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(N, generator=g, dtype=torch.float64) > 0).double() * 2 - 1
    return x, y


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.full((D,), 2.0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (margin, regularizer) per row: the regularizer is part of every example's loss, so
        # f = mean of per-example losses and clipping sees the whole per-example gradient.
        t = self.theta
        reg = (t**2 / (1 + t**2)).sum().expand(x.shape[0])
        return torch.stack([x @ t, reg], dim=1)


def make_loss(model: Model):
    def per_row(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(-y * out[:, 0]) + LAM * out[:, 1]

    return per_row


def full_grad_sq(model: Model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad()
    make_loss(model)(model(x), y).mean().backward()
    return float(model.theta.grad.pow(2).sum())


def run(optimizer: str, steps: int, seed: int, sigma: float, batch: int, lr0: float) -> float:
    x, y = problem()
    model = Model()
    mech = DPMechanism(
        DPConfig(
            dataset_size=N,
            expected_batch_size=batch,
            clip_norm=1.0,
            target_delta=1e-5,
            noise_multiplier=sigma,
            seed=seed,
            physical_batch_size=batch * 2,
            engine="vmap",
        ),
        model,
        make_loss(model),
    )
    lr = lr0 / math.sqrt(steps)
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr)
        if optimizer == "dp-sgd"
        else MicroAdam(
            model.parameters(), lr=lr, density=0.25, ef_bits=None, value_dtype=torch.float64
        )
    )
    best = full_grad_sq(model, x, y)
    for _ in range(steps):
        idx = mech.sample()
        mech.privatize(x[idx], y[idx])
        opt.step()
        best = min(best, full_grad_sq(model, x, y))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 400, 800, 1600])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    lr0 = {"dp-sgd": 20.0, "dp-microadam": 1.0}
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    rows = []
    for opt in ("dp-sgd", "dp-microadam"):
        for T in args.steps:
            vals = [run(opt, T, s, args.sigma, args.batch, lr0[opt]) for s in range(args.seeds)]
            rows.append(
                {
                    "optimizer": opt,
                    "steps": T,
                    "sigma": args.sigma,
                    "batch": args.batch,
                    "lr0": lr0[opt],
                    "min_grad_sq_mean": statistics.fmean(vals),
                    "min_grad_sq_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                }
            )
            print(rows[-1], flush=True)
    with (out / "convergence.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for opt in ("dp-sgd", "dp-microadam"):
        rs = [r for r in rows if r["optimizer"] == opt]
        ts = np.array([r["steps"] for r in rs], dtype=float)
        ms = np.array([r["min_grad_sq_mean"] for r in rs])
        slope, icept = np.polyfit(np.log(ts), np.log(ms), 1)
        print(f"{opt}: fitted slope of log min‖∇f‖² against log T = {slope:.3f}")
        ax.errorbar(
            ts,
            ms,
            yerr=[r["min_grad_sq_std"] for r in rs],
            marker="o",
            capsize=3,
            label=f"{opt} (slope {slope:.2f})",
        )
        ax.plot(ts, np.exp(icept) * ts**slope, ls=":", color="gray")
    ts = np.array(args.steps, dtype=float)
    ax.plot(ts, ms[0] * (ts / ts[0]) ** -0.5, ls="--", color="k", alpha=0.4, label="∝ T^-1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("T (steps)")
    ax.set_ylabel("min over t ≤ T of ‖∇f(θ_t)‖²")
    ax.set_title(f"fixed σ = {args.sigma}, lr = lr0/√T", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "convergence.png")


if __name__ == "__main__":
    main()
