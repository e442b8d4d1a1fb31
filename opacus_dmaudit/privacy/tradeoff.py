"""The membership test's trade-off: empirical ROC, AUROC, TPR at a low FPR, the Gaussian curve.

A membership test scores members (samples in the step) and non-members; thresholding the score
gives a true-positive rate (TPR) for every false-positive rate (FPR). A µ-GDP mechanism allows at
most ``TPR = Φ(Φ⁻¹(FPR) + µ)`` (:func:`gaussian_tradeoff`, Dong, Roth & Su 2019): drawn beside
the empirical curve (:func:`roc_points`) at µ = 1/σ and at the measured µ, it shows how close the
audit's attack comes to what the claimed noise allows. The scores can be exported
(``dmaudit report --export-scores``) for other auditing tools.
"""

from __future__ import annotations

import numpy as np

__all__ = ["roc_points", "roc_curve", "gaussian_tradeoff", "auroc", "tpr_at_fpr"]


def roc_points(member, nonmember) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of "score ≥ t means member" at every threshold t, from (0, 0) to (1, 1).

    Args:
        member, nonmember: the scores of members and non-members (1-D).

    Returns:
        Two arrays of the same length, FPR non-decreasing (ties between the two groups give one
        diagonal step, as the empirical ROC does).
    """
    member = np.asarray(member, dtype=float).ravel()
    nonmember = np.asarray(nonmember, dtype=float).ravel()
    if member.size == 0 or nonmember.size == 0:
        raise ValueError("roc_points needs at least one member and one non-member score")
    scores = np.concatenate([member, nonmember])
    labels = np.concatenate([np.ones(member.size), np.zeros(nonmember.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]  # end of each tie group
    tp = np.cumsum(labels)[last]
    fp = np.cumsum(1 - labels)[last]
    tpr = np.r_[0.0, tp / member.size]
    fpr = np.r_[0.0, fp / nonmember.size]
    return fpr, tpr


def roc_curve(member, nonmember, *, points: int = 64) -> dict[str, list[float]]:
    """The empirical ROC for a record: ``{"fpr": [...], "tpr": [...]}``, at most ``points`` + 2
    of its corners (the strictest ones kept, spaced evenly in log FPR above them), rounded to
    5 decimals so a record stays small.

    Example:
        >>> roc_curve([2.0, 3.0], [0.0, 1.0])["tpr"]
        [0.0, 0.5, 1.0, 1.0, 1.0]
    """
    fpr, tpr = roc_points(member, nonmember)
    if fpr.size > points + 2:
        grid = np.unique(np.r_[0.0, np.geomspace(max(fpr[fpr > 0].min(), 1e-6), 1.0, points)])
        keep = np.unique(np.r_[0, np.searchsorted(fpr, grid, side="right") - 1, fpr.size - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [round(float(x), 5) for x in fpr], "tpr": [round(float(x), 5) for x in tpr]}


def gaussian_tradeoff(mu: float, fpr) -> np.ndarray:
    """The largest TPR a µ-GDP mechanism allows at each ``fpr``: ``Φ(Φ⁻¹(fpr) + µ)``."""
    from scipy.stats import norm

    fpr = np.clip(np.asarray(fpr, dtype=float), 0.0, 1.0)
    if np.isinf(mu):
        return np.where(fpr > 0, 1.0, 0.0) if mu > 0 else np.zeros_like(fpr)
    return norm.cdf(norm.ppf(fpr) + float(mu))


def auroc(member, nonmember) -> float:
    """Area under the ROC: the chance a member outscores a non-member (ties count half)."""
    from scipy.stats import rankdata

    member = np.asarray(member, dtype=float).ravel()
    nonmember = np.asarray(nonmember, dtype=float).ravel()
    if member.size == 0 or nonmember.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([member, nonmember]))
    u = ranks[: member.size].sum() - member.size * (member.size + 1) / 2
    return float(u / (member.size * nonmember.size))


def tpr_at_fpr(member, nonmember, fpr: float) -> float:
    """The empirical TPR at the strictest threshold whose empirical FPR is at most ``fpr``.

    With n non-members the empirical FPR moves in steps of 1/n: below 1/n this is the TPR above
    every non-member score (read it with the number of non-members).
    """
    fprs, tprs = roc_points(member, nonmember)
    ok = fprs <= fpr + 1e-12
    return float(tprs[ok].max()) if ok.any() else 0.0
