"""Scores of canaries and the guessing game that turns them into a lower bound on ε.

Pure functions of the observed values (no training): a score says how likely a canary was
included; :func:`guess_and_bound` guesses "in" for the highest scores, "out" for the lowest, and
:func:`dpmicroadam.accounting.lower_bound.epsilon_lower_bound` bounds ε from the correct guesses
(Steinke, Nasr, Jagielski, arXiv 2305.08846).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dpmicroadam.accounting.lower_bound import epsilon_lower_bound

__all__ = ["WHITE_BOX_SCORES", "GuessOutcome", "guess_and_bound", "white_box_scores"]

WHITE_BOX_SCORES = ("llr", "detrended", "sum")


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
