"""Opt-in one-run auditing with canaries (Steinke, Nasr & Jagielski, NeurIPS 2023).

**Canaries change the training data.** Use this only where that is acceptable: m canary examples
(e.g. random-noise images with random labels, which a model memorises most visibly, or mislabelled
public images) are each put into the training set with probability 1/2,
independently, by this module's own generator; after training, the auditor guesses for the
canaries with the highest scores "in" and for those with the lowest "out", and counts correct
guesses. A mechanism that is (ε, δ)-DP cannot make much more than a fraction e^ε/(1 + e^ε) of the
guesses correct; the number it did make gives a lower bound on ε from one training run (Theorem
and Appendix D of the paper: for r guesses and v correct ones, the p-value of "the run is
(ε, δ)-DP" is ``P[Bin(r, p) ≥ v] + 2mδ·max_i P[v−i ≤ Bin(r, p) < v]/i`` with p = e^ε/(1+e^ε);
the bound is the largest ε rejected at the chosen confidence). The guess counts are chosen from a
fixed grid, Bonferroni-corrected.

What it can detect: gross failures of the *whole run's* privacy that show in the final model
(no noise, no clipping, ε in the tens), in any model, without an imprint layer. What it cannot:
a moderately wrong ε. With black-box scores (the canaries' losses on the final model, as here)
one-run lower bounds on DP-SGD at realistic σ sit far below the true ε (the paper's
experiments), so a small lower bound is not evidence of privacy; and a lower bound, even a large
one, does not say which part of the mechanism broke (the mechanism checks of :mod:`.mechanism`
do). Compare with the accountant's ε of the whole run, not with per-step numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["Canaries", "one_run_p_value", "one_run_epsilon_lower", "GUESS_FRACTIONS"]

#: The guess counts tried, as fractions of the canaries (k guesses "in" and k "out" each).
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.3)


def one_run_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float):
    """Probability of at least ``correct`` right guesses out of ``guesses`` under (ε, δ)-DP.

    Args:
        canaries: m, the canaries each included with probability 1/2.
        guesses: r, guesses made (abstentions excluded).
        correct: v, right guesses.
        epsilon, delta: the DP guarantee tested.
    """
    from scipy import stats

    m, r, v = int(canaries), int(guesses), int(correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("epsilon must be non-negative and delta in [0, 1]")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # pmf(v-1), pmf(v-2), ..., pmf(0)
    spread = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * spread, 1.0)


def one_run_epsilon_lower(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest ε that ``correct`` right guesses reject at ``confidence`` (0 if none)."""
    _check_confidence(confidence)
    beta = 1 - confidence
    kw = dict(canaries=canaries, guesses=guesses, correct=correct, delta=delta)
    if one_run_p_value(epsilon=0.0, **kw) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(epsilon=hi, **kw) < beta and hi < 1e3:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if one_run_p_value(epsilon=mid, **kw) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def _check_confidence(confidence: float) -> None:
    ok = isinstance(confidence, int | float) and not isinstance(confidence, bool)
    if not ok or not 0 < confidence < 1:
        raise ValueError(
            f"confidence must be a probability in (0, 1), e.g. 0.95; got {confidence!r}"
        )


def _check_scores(s: torch.Tensor, m: int) -> None:
    """Scores that can rank the canaries: one finite number each, not all equal."""
    if s.numel() != m:
        raise ValueError(f"expected {m} scores, got {s.numel()}")
    bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"the scores of canaries {bad[:10]} are NaN or infinite: a loss that overflowed or a "
            "model that diverged gives no ranking; fix the scores (e.g. compute the loss in "
            "float64) before auditing"
        )
    if bool((s == s[0]).all()):
        raise ValueError(
            f"all {m} scores equal {float(s[0])!r}: constant scores cannot rank the canaries "
            "(a model that outputs a constant, or the wrong scores); the audit would report "
            "ε_lower = 0 for no reason"
        )


class Canaries:
    """m canaries, each in the training data with probability 1/2 (opt-in: changes the data).

    Args:
        images: ``(m, ...)`` canary inputs (public or synthetic, never real private data).
        labels: ``(m,)`` their labels (mislabelled canaries are memorised most visibly).
        seed: seed of this object's own generator, which decides the inclusions (never the
            global RNG).

    Attributes:
        included: ``(m,)`` bool, which canaries are in the training data.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> None:
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.shape[0] != labels.shape[0] or images.shape[0] < 2:
            raise ValueError("give at least two canaries, with one label per image")
        self.images, self.labels = images, labels
        gen = torch.Generator().manual_seed(int(seed))
        self.included = torch.rand(images.shape[0], generator=gen) < 0.5

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def dataset(self) -> torch.utils.data.TensorDataset:
        """The included canaries, to concatenate with the training set before ``make_private``."""
        return torch.utils.data.TensorDataset(
            self.images[self.included], self.labels[self.included]
        )

    @torch.no_grad()
    def scores(
        self,
        model: torch.nn.Module,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Each canary's score, higher for "trained on": minus its loss on ``model``.

        Runs ``model`` in eval mode without gradients (its training mode is restored); call it
        between training steps or after training, never inside one.
        """
        loss_fn = loss_fn or (
            lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")
        )
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            out = []
            for start in range(0, len(self), batch_size):
                xb = self.images[start : start + batch_size].to(device)
                yb = self.labels[start : start + batch_size].to(device)
                out.append(-loss_fn(model(xb), yb).detach().float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    def audit(
        self, scores: torch.Tensor, *, delta: float, confidence: float = 0.95
    ) -> dict[str, Any]:
        """The one-run ε lower bound from the canaries' scores.

        For each fraction f of :data:`GUESS_FRACTIONS`, guess "in" for the ⌈f·m⌉ highest scores
        and "out" for as many of the lowest; the best bound over the grid is reported, each at
        ``1 − (1 − confidence)/len(grid)`` (Bonferroni).

        Raises:
            ValueError: a score is NaN or infinite, all scores are equal (they rank nothing), or
                ``confidence`` is not in (0, 1).
        """
        _check_confidence(confidence)
        s = torch.as_tensor(scores).double().flatten()
        m = len(self)
        _check_scores(s, m)
        order = torch.argsort(s, descending=True)
        level = 1 - (1 - confidence) / len(GUESS_FRACTIONS)
        best = {"epsilon_lower": 0.0, "guesses": 0, "correct": 0}
        for frac in GUESS_FRACTIONS:
            k = max(1, math.ceil(frac * m))
            if 2 * k > m:
                continue
            top, bottom = order[:k], order[-k:]
            correct = int(self.included[top].sum()) + int((~self.included[bottom]).sum())
            eps = one_run_epsilon_lower(
                canaries=m, guesses=2 * k, correct=correct, delta=delta, confidence=level
            )
            if eps > best["epsilon_lower"] or best["guesses"] == 0:
                best = {"epsilon_lower": eps, "guesses": 2 * k, "correct": correct}
        best.update(canaries=m, included=int(self.included.sum()), delta=delta)
        best["confidence"] = confidence
        return best
