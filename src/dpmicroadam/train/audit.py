r"""Privacy auditing in one training run: an empirical lower bound on ε.

Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", arXiv 2305.08846.

m canaries are drawn; each is included in the run independently with probability 1/2. The run is
an ordinary `dpmicroadam train` run (the same :class:`~dpmicroadam.train.loop.Trainer`, the same
:class:`~dpmicroadam.mechanism.DPMechanism`: sampler, clipping, noise, accountant). Afterwards each
canary gets a score, the auditor guesses "included" for the highest scores and "excluded" for the
lowest, abstains on the rest, and :func:`dpmicroadam.accounting.audit.epsilon_lower_bound` turns
the number of correct guesses into an ε that the run provably exceeds with the stated confidence.

Two settings:

- ``"white-box"``: *Dirac gradient canaries*. Canary i is an example whose gradient is
  ``canary_norm · e_{c_i}`` (one coordinate c_i of the flattened trainable parameters, distinct per
  canary). When it is included *and* drawn by its own Poisson sampler at the run's rate q, its
  gradient is clipped by the library's flat clipping and added to the mechanism's
  :class:`~dpmicroadam.privacy.PrivateGradient` sum before the real batch, so the same release adds
  the same noise. The auditor sees every released gradient; canary i is scored from the series
  g̃_t[c_i] (:func:`white_box_scores`). This is the strongest (tightest) setting: it checks the
  clipping, the release, the noise and the sampling rate, independently of the model.
- ``"black-box"``: *input-space canaries*. Random inputs (per-feature mean and std of the training
  data) with random labels are appended to the training set when included. Only the final model
  is seen; the score is the negative loss of the canary. Bounds are far below the accounted ε:
  this setting measures what an attacker who sees the final weights can show, not the mechanism.

What it shows: a lower bound above the accounted ε means the code does not do what the accounting
assumes (a bug). A bound below it shows nothing more: the accounting may still be wrong in ways
these canaries cannot see.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpmicroadam.accounting.audit import epsilon_lower_bound
from dpmicroadam.data.sampler import PoissonSampler
from dpmicroadam.mechanism import derive_seed
from dpmicroadam.privacy.per_example import clip_and_sum
from dpmicroadam.train.config import TrainConfig
from dpmicroadam.train.loop import Trainer, cross_entropy_per_row

__all__ = [
    "AUDIT_MODES",
    "WHITE_BOX_SCORES",
    "AuditConfig",
    "AuditResult",
    "Auditor",
    "GuessOutcome",
    "guess_and_bound",
    "run_audit",
    "white_box_scores",
]

AUDIT_MODES = ("white-box", "black-box")
WHITE_BOX_SCORES = ("llr", "detrended", "sum")
_CANARY_CHUNK = 64  # canary gradients are materialized densely this many at a time


@dataclass
class AuditConfig:
    """Settings of an audit (the training settings are a :class:`TrainConfig`).

    Attributes:
        mode: ``"white-box"`` (gradient canaries, every release observed) or ``"black-box"``
            (input canaries scored by the final model's loss).
        canaries: m, the number of canaries (half of them, in expectation, are included).
        confidence: Confidence of the ε lower bound, e.g. 0.95.
        guesses: r, the number of guesses (half "in" for the top scores, half "out" for the
            bottom). ``None`` tries r ∈ {m/50, m/20, m/10, m/5, m/2, m} and keeps the best, with a
            Bonferroni correction so the stated confidence holds for the reported bound.
        canary_norm: White-box: L2 norm of a canary's gradient before clipping (default 2·C, so
            clipping must bring it down to C).
        score: White-box score: ``"auto"`` (default: both ``"llr"``, the most powerful with
            noise, and ``"detrended"``, the most powerful without, Bonferroni-corrected),
            ``"llr"``, ``"detrended"`` or ``"sum"``; see :func:`white_box_scores`.
    """

    mode: str = "white-box"
    canaries: int = 1000
    confidence: float = 0.95
    guesses: int | None = None
    canary_norm: float | None = None
    score: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in AUDIT_MODES:
            raise ValueError(f"mode must be one of {AUDIT_MODES}, got {self.mode!r}")
        if isinstance(self.canaries, bool) or int(self.canaries) != self.canaries:
            raise TypeError(f"canaries must be an int, got {self.canaries!r}")
        if self.canaries < 2:
            raise ValueError(f"canaries must be >= 2, got {self.canaries!r}; use e.g. 1000")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {self.confidence!r}")
        if self.guesses is not None and not 1 <= self.guesses <= self.canaries:
            raise ValueError(
                f"guesses={self.guesses!r} must be in [1, canaries={self.canaries}] (or None)"
            )
        if self.score not in (*WHITE_BOX_SCORES, "auto"):
            raise ValueError(f"score must be one of {WHITE_BOX_SCORES}, got {self.score!r}")
        if self.canary_norm is not None and not 0 < self.canary_norm < math.inf:
            raise ValueError(f"canary_norm must be finite and > 0, got {self.canary_norm!r}")


@dataclass(frozen=True)
class GuessOutcome:
    """The guesses kept and the bound they give."""

    k_pos: int
    k_neg: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    tested: int  # number of (score, k_pos, k_neg) choices tried (Bonferroni factor)
    score_index: int = 0  # which row of a 2-D ``scores`` gave the bound


def guess_and_bound(
    scores: np.ndarray,
    included: np.ndarray,
    confidence: float = 0.95,
    delta: float = 0.0,
    guesses: int | None = None,
) -> GuessOutcome:
    """Guess "in" for the ``k_pos`` highest scores, "out" for the ``k_neg`` lowest; bound ε.

    Args:
        scores: One score per canary (higher: more likely included); or ``(k, m)``: k scoring
            rules, all tried.
        included: The truth, m booleans.
        confidence: Confidence of the returned bound (overall, after the Bonferroni correction
            when several scores or guess counts are tried).
        delta: δ of the hypotheses (the run's δ).
        guesses: Fixed number of guesses r; ``None`` tries a small grid (see :class:`AuditConfig`).

    Returns:
        The best :class:`GuessOutcome`.
    """
    rows = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    truth = np.asarray(included, dtype=bool)
    if rows.ndim != 2 or truth.ndim != 1 or rows.shape[1] != truth.size:
        raise ValueError(
            f"scores {np.shape(scores)} must be (m,) or (k, m) for included of shape {truth.shape}"
        )
    m = int(truth.size)
    if guesses is None:
        grid = sorted({max(1, round(m * f)) for f in (1 / 50, 1 / 20, 1 / 10, 1 / 5, 1 / 2, 1)})
    else:
        grid = [int(guesses)]
    tests = len(grid) * rows.shape[0]
    per_test = 1.0 - (1.0 - confidence) / tests
    best: GuessOutcome | None = None
    for index, row in enumerate(rows):
        order = np.argsort(-row, kind="stable")  # highest first; ties by index, not by truth
        ranked = truth[order]
        for r in grid:
            k_pos = (r + 1) // 2
            k_neg = r - k_pos
            correct = int(ranked[:k_pos].sum()) + int((~ranked[m - k_neg :]).sum())
            eps = epsilon_lower_bound(m, r, correct, per_test, delta)
            outcome = GuessOutcome(k_pos, k_neg, r, correct, eps, tests, index)
            if best is None or eps > best.epsilon_lower_bound:
                best = outcome
    assert best is not None
    return best


@dataclass
class AuditResult:
    """Outcome of one audit; ``summary()`` is what goes to ``audit.json``.

    ``tests`` is the number of (score, guess count) choices tried: the bound holds at
    ``confidence`` after the Bonferroni correction for all of them.
    """

    mode: str
    score: str
    epsilon_lower_bound: float
    confidence: float
    accounted_epsilon: float
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    k_pos: int
    k_neg: int
    tests: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    optimizer: str
    test_accuracy: float
    wall_seconds: float
    out: str
    scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    truth: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=bool))

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("scores")
        d.pop("truth")
        for key in ("accounted_epsilon", "epsilon_lower_bound"):
            if not math.isfinite(d[key]):
                d[key] = None if math.isnan(d[key]) else "inf"
        return d

    def line(self) -> str:
        acc = f"{self.accounted_epsilon:.3f}" if math.isfinite(self.accounted_epsilon) else "inf"
        verdict = (
            "VIOLATION: the run leaks more than accounted"
            if self.epsilon_lower_bound > self.accounted_epsilon
            else "consistent with the accounting"
        )
        return (
            f"{self.mode} audit: ε ≥ {self.epsilon_lower_bound:.3f} at "
            f"{100 * self.confidence:g} % confidence (accounted ε = {acc}, δ = {self.delta:g}); "
            f"{self.correct} of {self.guesses} guesses correct on {self.canaries} canaries; "
            f"{verdict}"
        )


class _WhiteBoxTrainer(Trainer):
    """A Trainer that injects Dirac gradient canaries into each release and records scores."""

    def __init__(self, cfg: TrainConfig, audit: AuditConfig) -> None:
        if cfg.normalize != "expected":
            raise ValueError(
                f"normalize={cfg.normalize!r}: the white-box audit injects canaries into the "
                "released sum and supports only normalize='expected' (the analysed release)"
            )
        super().__init__(cfg)
        mech = self.mechanism
        params = mech.params
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        m = audit.canaries
        if m > total:
            raise ValueError(
                f"canaries={m} is more than the model's {total} trainable coordinates: white-box "
                "canaries need one coordinate each; use fewer canaries or a larger model"
            )
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "audit-canary-coordinates"))
        coords = torch.randperm(total, generator=gen)[:m]
        gen_in = torch.Generator().manual_seed(derive_seed(cfg.seed, "audit-inclusion"))
        self.included = torch.rand(m, generator=gen_in) < 0.5
        offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()])
        self._param_of = torch.searchsorted(offsets, coords, right=True) - 1
        self._local_of = coords - offsets[self._param_of]
        self._by_param = []
        for j in range(len(params)):
            ids = torch.nonzero(self._param_of == j).flatten()
            self._by_param.append((ids, self._local_of[ids]))
        self.canary_sampler = PoissonSampler(
            m, mech.sample_rate, seed=derive_seed(cfg.seed, "audit-canary-sampler")
        )
        self.canary_value = float(audit.canary_norm or 2.0 * mech.config.clip_norm)
        self.score = audit.score
        self._trace: list[torch.Tensor] = []  # released g̃_t[c_i] per step, (m,) each
        self._hook = self.optimizer.register_step_pre_hook(self._observe)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super()._batch()  # draws the real batch: mechanism.sample()
        drawn = self.canary_sampler.sample()
        drawn = drawn[self.included[drawn]]
        params = self.mechanism.params
        for chunk in drawn.split(_CANARY_CHUNK):
            b = int(chunk.numel())
            grads = [p.new_zeros((b, *p.shape)) for p in params]
            rows = torch.arange(b)
            owner = self._param_of[chunk]
            for j, g in enumerate(grads):
                sel = owner == j
                if bool(sel.any()):
                    g.view(b, -1)[rows[sel], self._local_of[chunk[sel]]] = self.canary_value
            sums, _ = clip_and_sum(grads, self.mechanism.config.clip_norm)
            # count=0: the mechanism checks that the examples it releases are the ones its own
            # sampler drew; canaries are extra examples with their own sampler. With
            # normalize="expected" (enforced above) the count does not enter the release.
            self.mechanism.gradient.accumulate(sums, 0)
        return x, y

    def _observe(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # Runs before optimizer.step(): p.grad holds exactly the released gradient.
        row = torch.zeros(self.included.numel(), dtype=torch.float32)  # T·m floats kept
        for p, (ids, local) in zip(self.mechanism.params, self._by_param):
            if ids.numel():
                row[ids] = p.grad.detach().reshape(-1)[local].to("cpu", torch.float32)
        self._trace.append(row)

    def canary_scores(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        trace = torch.stack(self._trace) if self._trace else torch.zeros(1, self.included.numel())
        mech = self.mechanism
        names = ("llr", "detrended") if self.score == "auto" else (self.score,)
        scores = {
            name: white_box_scores(
                trace,
                name,
                unit=mech.config.clip_norm / mech.config.expected_batch_size,
                noise_multiplier=mech.noise_multiplier,
                sample_rate=mech.sample_rate,
            ).numpy()
            for name in names
        }
        return scores, self.included.numpy().copy()


def white_box_scores(
    trace: torch.Tensor,
    score: str = "llr",
    window: int = 5,
    *,
    unit: float = 1.0,
    noise_multiplier: float = 0.0,
    sample_rate: float = 1.0,
) -> torch.Tensor:
    r"""Scores of Dirac canaries from the released gradients at their coordinates.

    Args:
        trace: ``(T, m)``: ``trace[t, i]`` = g̃_t[c_i], the released gradient at canary i's
            coordinate.
        score: ``"sum"``: ``Σ_t g̃_t[c_i]`` (the paper's score). ``"detrended"``: the same sum
            after subtracting, at each step, the median of the coordinate over the ``window``
            steps before and after it: the real data's gradient at a coordinate drifts
            slowly and would otherwise swamp the canary's C/B on the few steps it is drawn.
            ``"llr"``: on the values z_t in units of the canary's contribution C/B, the
            log-likelihood ratio of "drawn with probability q" against "absent" under
            Gaussian noise of std σ, summed over steps (Neyman–Pearson for one canary; not
            detrended: with σ > 0 the noise dwarfs the drift, and the median would add noise):

            .. math:: \sum_t \log\big(1 - q + q\, e^{(z_t - 1/2)/\sigma^2}\big)

            It falls back to ``"detrended"`` when σ = 0. Any score that does not look at
            which canaries were included gives a valid bound; these differ only in power.
        window: Half-width of the median window.
        unit: The canary's contribution to the released gradient, C/B.
        noise_multiplier: σ (``"llr"`` only).
        sample_rate: q (``"llr"`` only).
    """
    trace = trace.to(torch.float64)
    if score not in WHITE_BOX_SCORES:
        raise ValueError(f"score must be one of {WHITE_BOX_SCORES}, got {score!r}")
    if score == "sum":
        return trace.sum(0)
    if score == "llr" and noise_multiplier > 0:
        z = trace / unit
        var = noise_multiplier**2
        if sample_rate >= 1:
            return ((z - 0.5) / var).sum(0)
        log_in = math.log(sample_rate) + (z - 0.5) / var
        return torch.logaddexp(torch.full_like(z, math.log1p(-sample_rate)), log_in).sum(0)
    steps = trace.shape[0]
    w = min(window, (steps - 1) // 2)
    if w < 1:
        return trace.sum(0)
    out = torch.empty(trace.shape[1], dtype=torch.float64)
    for start in range(0, trace.shape[1], 256):  # bounded memory: (T, 256, 2w) at a time
        part = trace[:, start : start + 256]
        # Reflect without repeating the edge step, so a canary drawn at the first or last step
        # is not its own median.
        padded = torch.cat([part[1 : w + 1].flip(0), part, part[-w - 1 : -1].flip(0)])
        windows = padded.unfold(0, 2 * w + 1, 1)  # (T, k, 2w+1), step t in the middle
        # Median of the 2w neighbours (step t's own value, maybe a canary draw, left out): the
        # mean of the two middle values, so a linear drift is removed exactly.
        neighbours = torch.cat([windows[..., :w], windows[..., w + 1 :]], dim=-1)
        middle = neighbours.sort(dim=-1).values[..., w - 1 : w + 1].mean(dim=-1)
        out[start : start + 256] = (part - middle).sum(0)
    return out


class _BlackBoxTrainer(Trainer):
    """A Trainer whose training set holds the included input-space canaries."""

    def __init__(self, cfg: TrainConfig, audit: AuditConfig) -> None:
        self.audit = audit
        super().__init__(cfg)

    def build_task(self) -> tuple[tuple[torch.Tensor, ...], torch.nn.Module]:
        splits, model = super().build_task()
        x_tr, y_tr, x_val, y_val, x_test, y_test = splits
        m = self.audit.canaries
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "audit-canaries"))
        num_classes = int(max(int(y.max()) for y in (y_tr, y_val, y_test) if y.numel())) + 1
        x = x_tr.float()
        noise = torch.randn((m, *x.shape[1:]), generator=gen)
        self.canary_x = (x.mean(0) + x.std(0) * noise).to(x_tr.dtype)
        self.canary_y = torch.randint(0, num_classes, (m,), generator=gen)
        gen_in = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "audit-inclusion"))
        self.included = torch.rand(m, generator=gen_in) < 0.5
        x_tr = torch.cat([x_tr, self.canary_x[self.included]])
        y_tr = torch.cat([y_tr, self.canary_y[self.included]])
        return (x_tr, y_tr, x_val, y_val, x_test, y_test), model

    @torch.no_grad()
    def canary_scores(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        import contextlib

        self.model.eval()
        ctx = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        losses = []
        with ctx:
            for start in range(0, self.audit.canaries, 1024):
                xb = self.canary_x[start : start + 1024].to(self.device)
                yb = self.canary_y[start : start + 1024].to(self.device)
                losses.append(cross_entropy_per_row(self.model(xb), yb).double().cpu())
        return {"neg-loss": (-torch.cat(losses)).numpy()}, self.included.numpy().copy()


class Auditor:
    """One audit run. Build it, optionally inspect ``trainer``, then :meth:`run`.

    Args:
        cfg: A resolved config of a private run (``dp-*`` optimizer).
        audit: The audit settings.
    """

    def __init__(self, cfg: TrainConfig, audit: AuditConfig | None = None) -> None:
        self.audit = audit or AuditConfig()
        if not cfg.private:
            raise ValueError(
                f"optimizer {cfg.optimizer!r} is not private: an audit needs a dp-* optimizer "
                "(dp-microadam, dp-sgd, dp-adam, dp-adambc)"
            )
        if cfg.resume:
            raise ValueError("an audit cannot --resume: canary scores are not checkpointed")
        kind = _WhiteBoxTrainer if self.audit.mode == "white-box" else _BlackBoxTrainer
        self.trainer = kind(cfg, self.audit)

    def run(self) -> AuditResult:
        start = time.perf_counter()
        trainer = self.trainer
        # The training steps of `train` (sample, privatize, step, schedule, EMA), without its
        # periodic evaluation, checkpoints and ε for the progress bar: the audit needs none.
        while trainer.step < trainer.total_steps:
            trainer._train_step()
        test_accuracy, _ = trainer.evaluate(trainer.x_test, trainer.y_test)
        by_name, truth = trainer.canary_scores()
        names = list(by_name)
        mech = self.trainer.mechanism
        delta = float(mech.config.target_delta)
        a = self.audit
        matrix = np.stack([by_name[n] for n in names])
        outcome = guess_and_bound(matrix, truth, a.confidence, delta, a.guesses)
        scores = matrix[outcome.score_index]
        result = AuditResult(
            mode=a.mode,
            score=names[outcome.score_index],
            epsilon_lower_bound=outcome.epsilon_lower_bound,
            confidence=a.confidence,
            accounted_epsilon=mech.epsilon(),
            delta=delta,
            canaries=a.canaries,
            included=int(truth.sum()),
            guesses=outcome.guesses,
            correct=outcome.correct,
            k_pos=outcome.k_pos,
            k_neg=outcome.k_neg,
            tests=outcome.tested,
            noise_multiplier=mech.noise_multiplier,
            sample_rate=mech.sample_rate,
            steps=self.trainer.step,
            clip_norm=float(mech.config.clip_norm),
            optimizer=self.trainer.cfg.optimizer,
            test_accuracy=float(test_accuracy),
            wall_seconds=round(time.perf_counter() - start, 2),
            out=str(self.trainer.out),
            scores=scores,
            truth=truth,
        )
        out = Path(self.trainer.out)
        (out / "audit.json").write_text(json.dumps(result.summary(), indent=2))
        np.savez(
            out / "audit_scores.npz",
            included=truth,
            **{n.replace("-", "_"): by_name[n] for n in names},
        )
        plot_scores(result, out / "audit_scores.png")
        return result


def run_audit(cfg: TrainConfig, audit: AuditConfig | None = None) -> AuditResult:
    """Train once with canaries and return the ε lower bound (also written to ``audit.json``).

    Example:
        >>> from dpmicroadam.train.config import resolve_config
        >>> cfg = resolve_config({"dataset": "digits", "optimizer": "dp-sgd", "epsilon": 2.0,
        ...                       "steps": 200, "batch_size": 64, "out": "runs/audit"})
        >>> print(run_audit(cfg, AuditConfig(canaries=1000)).line())
    """
    return Auditor(cfg, audit).run()


def plot_scores(result: AuditResult, path: str | Path) -> Path:
    """Histogram of canary scores, included vs excluded, with the guess thresholds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    scores, truth = result.scores, result.truth
    fig, ax = plt.subplots(figsize=(6, 3.5))
    finite = scores[np.isfinite(scores)]
    bins = np.linspace(finite.min(), finite.max(), 50) if finite.size else 10
    ax.hist(scores[truth], bins=bins, alpha=0.6, label=f"included ({int(truth.sum())})")
    ax.hist(scores[~truth], bins=bins, alpha=0.6, label=f"excluded ({int((~truth).sum())})")
    ranked = np.sort(scores)[::-1]
    if result.k_pos:
        ax.axvline(ranked[result.k_pos - 1], color="k", ls="--", lw=0.8)
    if result.k_neg:
        ax.axvline(ranked[len(ranked) - result.k_neg], color="k", ls=":", lw=0.8)
    ax.set_xlabel(f"canary score ({result.score})")
    ax.set_ylabel("canaries")
    ax.set_title(
        f"{result.mode}: ε ≥ {result.epsilon_lower_bound:.2f} "
        f"(accounted {result.accounted_epsilon:.2f})",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
