"""Empirical privacy from the imprint bins: a measured per-step µ and an ε lower bound.

At an audited step of a live imprint audit every bin is a small membership experiment. A bin
that holds exactly one sample (a *lone* bin) holds that sample's clipped contribution ``v`` plus
the noise; an empty bin holds the noise alone, i.e. what the lone bin would hold had its sample
not been in the batch. The auditor knows ``v`` (the clean clipped sum), so it can run the best
test there is for "is this sample in the step?": the projection of the noised row on ``v/‖v‖``,
in units of the claimed noise std σC (the *oracle projection test*: the white-box adversary of
DP auditing, who knows the target's gradient). A member scores ``N(‖v‖/σC, 1)``, a non-member
(an empty bin, projected on the direction of some lone bin's ``v``) ``N(0, 1)`` when the
mechanism is correct. Bins do not share noise (the cumulative structure's neighbouring
differences do, so only every other one is used), and steps do not either, so scores pooled over
the audits of a run are independent trials.

Two estimates, in ``privacy_measured``:

* ``mu_step_measured`` with ``mu_step_ci``: the Gaussian trade-off's µ of one step given the
  sample's inclusion, ``(mean member score − mean non-member score) / std of non-member scores``,
  with a normal 95 % interval. It assumes Gaussian scores. It is comparable with the claimed
  ``mu_step`` = 1/σ (equal when the imprint takes the whole clipping budget, smaller when it
  takes part of it). It detects noise smaller than claimed and contributions larger than C
  (both raise it above 1/σ) with a few hundred trials; it cannot see sampling or accounting bugs
  (it is conditional on the sample being in the batch), nor anything at steps not audited.
* ``epsilon_lower``: a lower bound on the ε of one step (given inclusion) at the run's δ that
  holds for *any* mechanism at 95 % confidence: for fixed thresholds on the score (a grid of
  multiples of 1/σ, chosen before seeing the scores), Clopper–Pearson bounds on the true and
  false positive rates, ε ≥ log((TPR − δ)/FPR) (and the same for the complementary test),
  Bonferroni-corrected over the grid. Compare it with ``epsilon_step_claimed``, the ε of one
  Gaussian step with µ = 1/σ at δ. With n trials it cannot exceed about log(n/3) whatever the
  mechanism: a few hundred trials bound ε by about 4–5, so it says little about claimed per-step
  ε above that (halved noise at σ = 0.5 goes unnoticed) and is no substitute for the direct
  mechanism checks (:mod:`.mechanism`). It says nothing about the whole run's ε (subsampling and
  composition), which is a different, much smaller-per-step quantity.

More read the pooled scores: ``auroc`` and ``tpr_at_fpr_0.001`` (the trade-off picture, see
:mod:`.tradeoff`); ``mu_step_full_budget`` with its interval, the per-step µ of a member that
takes the whole clipping budget (:func:`full_budget_mu`: every member's score weighed by its
share of C, so that members whose gradient was small, e.g. well-fitted samples late in
training, still count; 1/σ under a correct mechanism); and ``epsilon_composed``: that µ's lower
confidence limit µ̂_low composed over the run's real ``(σ, q, T)`` history as a
Poisson-subsampled Gaussian with noise multiplier ``1/µ̂_low`` (for a run at one σ), under the
user's accountant type. That is the whole
run's ε *if* every step is µ̂-GDP given inclusion (the Gaussian-DP assumption of Nasr et al.
2023, "Tight auditing of differentially private machine learning"): a heuristic estimate, not a
bound, labelled as such (``epsilon_composed_note``); ``epsilon_lower`` stays the
assumption-free one-step bound beside it.

Scores are pooled over audits with the same (σ, C) and restart when either changes; shadow audits
(simulated sums: their noise is the auditor's own, so their µ says nothing about the mechanism)
and steps without noise give no scores. Each audit's scores go into its record
(``evidence["membership"]``), so a resumed run pools them again (:meth:`EmpiricalPrivacy.restore`)
and ``dmaudit report --export-scores`` can write them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..capture.step import CapturedStep

__all__ = [
    "membership_scores",
    "gaussian_mu",
    "epsilon_lower_bound",
    "composed_epsilon",
    "EmpiricalPrivacy",
    "THRESHOLD_GRID",
    "COMPOSED_NOTE",
    "SHADOW_NOTE",
]

#: The label of ``epsilon_composed`` wherever it is shown.
COMPOSED_NOTE = (
    "heuristic, not a bound: the membership test's per-step µ at a full clipping budget (95% "
    "lower limit) composed over the run's (σ, q, T) as a subsampled Gaussian, assuming each "
    "step is µ-GDP (Nasr et al. 2023)"
)

#: What a shadow audit's record says instead of membership estimates.
SHADOW_NOTE = (
    "shadow mode: the simulated adversary's noise is the auditor's own, so a membership µ "
    "measured on it says nothing about the mechanism; epsilon_measured (from the noise the "
    "optimizer really added) answers instead"
)

#: Score thresholds of the ε lower bound, in multiples of the claimed µ = 1/σ (fixed in advance).
THRESHOLD_GRID = tuple(k / 4 for k in range(1, 9))


def membership_scores(captured: CapturedStep) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Oracle projection scores of the lone bins (members) and the empty bins (non-members), and
    each member's share of the clipping budget (its clean row's norm over C: a member scores
    N(share/σ, 1) under a correct mechanism).

    Returns ``None`` without live imprint sums, without noise, or without a lone bin.
    """
    sums = captured.imprint
    noise = captured.noise_std
    if sums is None or sums.simulated or not noise > 0 or sums.membership.numel() == 0:
        return None
    from ..reconstruct.bins import bin_rows, lone_bins

    structure = sums.geometry.structure
    dw, db, factor = bin_rows(sums.weight_noised, sums.bias_noised, structure=structure)
    cw, cb, _ = bin_rows(sums.weight_clean, sums.bias_clean, structure=structure)
    lone = lone_bins(sums.membership)
    empty = (sums.membership != 0).sum(dim=1) == 0
    if structure != "sparse":  # neighbouring differences share a row: keep every other bin
        keep = torch.arange(lone.numel()) % 2 == 0
        lone, empty = lone & keep, empty & keep
    if not bool(lone.any()):
        return None
    noised = torch.cat([dw, db[:, None]], dim=1)
    clean = torch.cat([cw, cb[:, None]], dim=1)
    norms = clean.norm(dim=1, keepdim=True)
    lone &= norms[:, 0] > 0
    if not bool(lone.any()):
        return None
    directions = clean[lone] / norms[lone]
    scale = noise * factor
    member = (noised[lone] * directions).sum(dim=1) / scale[lone]
    idx = empty.nonzero().flatten()
    pick = directions[torch.arange(idx.numel()) % directions.shape[0]]
    nonmember = (noised[idx] * pick).sum(dim=1) / scale[idx]
    share = norms[lone, 0] / (captured.max_grad_norm * factor[lone])
    return member.numpy(), nonmember.numpy(), share.double().numpy()


def gaussian_mu(
    member: np.ndarray, nonmember: np.ndarray, *, confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """``(µ̂, low, high)``: the separation of Gaussian member and non-member scores.

    ``µ̂ = (mean(member) − mean(nonmember)) / std(nonmember)`` with a normal interval.
    """
    from scipy import stats

    if len(member) < 2 or len(nonmember) < 2:
        return None
    sd = float(np.std(nonmember, ddof=1))
    if not sd > 0:
        return None
    mu = (float(np.mean(member)) - float(np.mean(nonmember))) / sd
    se = math.sqrt(np.var(member, ddof=1) / len(member) + sd**2 / len(nonmember)) / sd
    se = math.sqrt(se**2 + mu**2 / (2 * (len(nonmember) - 1)))  # the std is estimated too
    z = float(stats.norm.isf((1 - confidence) / 2))
    return mu, mu - z * se, mu + z * se


def full_budget_mu(
    member: np.ndarray, nonmember: np.ndarray, share: np.ndarray, *, confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """``(µ̂, low, high)``: the per-step µ of a member that takes the whole clipping budget C.

    A member with budget share a (its contribution's norm over C) scores N(a·µ, 1) in units of
    the non-members' spread, so the least-squares estimate ``Σ a(s − m₀) / (sd₀ Σ a²)`` measures
    µ at a = 1 from every member, however small its share; times the largest share seen when it
    exceeds 1 (a contribution above C: broken clipping). Under a correct mechanism it is 1/σ: it
    measures what the noise lets through per unit of sensitivity, the quantity the accountant
    composes. Normal interval (the spread's estimate included).
    """
    from scipy import stats

    share = np.asarray(share, dtype=float)
    if len(member) < 2 or len(nonmember) < 2 or not (share**2).sum() > 0:
        return None
    sd = float(np.std(nonmember, ddof=1))
    if not sd > 0:
        return None
    m0 = float(np.mean(nonmember))
    weight = float((share**2).sum())
    unit = float((share * (member - m0)).sum()) / weight / sd
    se = math.sqrt(1 / weight + (share.sum() / weight) ** 2 / len(nonmember))
    se = math.sqrt(se**2 + unit**2 / (2 * (len(nonmember) - 1)))
    z = float(stats.norm.isf((1 - confidence) / 2))
    top = max(1.0, float(share.max()))
    return unit * top, (unit - z * se) * top, (unit + z * se) * top


def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided ``(lower, upper)`` bounds on a binomial rate, each at level ``alpha``."""
    from scipy import stats

    lower = 0.0 if k == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))
    upper = 1.0 if k == n else float(stats.beta.isf(alpha, k + 1, n - k))
    return lower, upper


def epsilon_lower_bound(
    member: np.ndarray,
    nonmember: np.ndarray,
    *,
    delta: float,
    thresholds: tuple[float, ...],
    confidence: float = 0.95,
) -> float:
    """The largest ε any threshold test on the scores proves, at ``confidence`` overall.

    Each threshold ``t`` gives the test "score ≥ t means member" and its complement; with
    Clopper–Pearson bounds on TPR and FPR (Bonferroni over thresholds and the two bounds),
    ``ε ≥ log((TPR_low − δ) / FPR_high)`` and ``ε ≥ log((TNR_low − δ) / FNR_high)``. 0 when no
    test proves more.
    """
    n_m, n_n = len(member), len(nonmember)
    if n_m == 0 or n_n == 0:
        return 0.0
    alpha = (1 - confidence) / (2 * len(thresholds))  # two bounds per threshold
    best = 0.0
    for t in thresholds:
        tp = int((member >= t).sum())
        fp = int((nonmember >= t).sum())
        tpr_lo, tpr_hi = _clopper_pearson(tp, n_m, alpha)
        fpr_lo, fpr_hi = _clopper_pearson(fp, n_n, alpha)
        if tpr_lo - delta > 0 and fpr_hi > 0:
            best = max(best, math.log((tpr_lo - delta) / fpr_hi))
        tnr_lo, fnr_hi = 1 - fpr_hi, 1 - tpr_lo
        if tnr_lo - delta > 0 and fnr_hi > 0:
            best = max(best, math.log((tnr_lo - delta) / fnr_hi))
    return best


def composed_epsilon(
    mu_low: float, *, history, kind: str, delta: float, orders=None
) -> float | None:
    """The run's ε if every step were µ_low-GDP given inclusion (see the module doc).

    The history's noise multipliers are scaled so that the last one becomes ``1/mu_low`` (the
    measured per-step µ; earlier σ keep their ratio to it), sampling rates and steps as given.
    ``None`` without a positive µ_low or a history.
    """
    from .accountant import epsilon_of_history

    history = [(float(s), float(q), int(t)) for s, q, t in history or [] if int(t) > 0]
    if not history or not mu_low > 0 or not history[-1][0] > 0:
        return None
    factor = (1.0 / mu_low) / history[-1][0]
    scaled = [(s * factor, q, t) for s, q, t in history]
    return epsilon_of_history(kind, scaled, delta=delta, orders=orders)[0]


@dataclass
class EmpiricalPrivacy:
    """Pools the membership scores of a run's audits and turns them into estimates.

    Args:
        delta: δ of the ε lower bound (the run's δ).
        confidence: confidence of the interval and of the lower bound.
    """

    delta: float
    confidence: float = 0.95
    _key: tuple[float, float] | None = field(default=None, repr=False)
    _member: list[np.ndarray] = field(default_factory=list, repr=False)
    _nonmember: list[np.ndarray] = field(default_factory=list, repr=False)
    _steps: list[int] = field(default_factory=list, repr=False)
    _share: list[np.ndarray] = field(default_factory=list, repr=False)

    def add(self, captured: CapturedStep) -> dict[str, Any] | None:
        """Add one audited step's scores; returns them for the record (``None``: none)."""
        from .packing import encode_floats

        scores = membership_scores(captured)
        if scores is None:
            return None
        key = (float(captured.noise_multiplier), float(captured.max_grad_norm))
        self.add_scores(scores[0], scores[1], scores[2], key=key, step=captured.step)
        return {
            "member": encode_floats(scores[0]),
            "nonmember": encode_floats(scores[1]),
            "member_share": encode_floats(scores[2]),
            "noise_multiplier": key[0],
            "max_grad_norm": key[1],
        }

    def add_scores(
        self, member, nonmember, share=None, *, key: tuple[float, float], step: int = 0
    ) -> None:
        """Pool one audit's scores (restarting the pool when (σ, C) changed); ``share``: each
        member's share of the clipping budget (``None``: unknown, taken as 1)."""
        if key != self._key:
            self._key, self._member, self._nonmember, self._steps = key, [], [], []
            self._share = []
        member = np.asarray(member, dtype=float)
        self._member.append(member)
        self._nonmember.append(np.asarray(nonmember, dtype=float))
        self._share.append(np.ones_like(member) if share is None else np.asarray(share, float))
        self._steps.append(int(step))

    def restore(self, records) -> None:
        """Pool the scores kept in records written before a resume (oldest first)."""
        from .packing import decode_floats

        for record in records:
            part = (getattr(record, "evidence", None) or {}).get("membership")
            if part:
                key = (float(part["noise_multiplier"]), float(part["max_grad_norm"]))
                member, nonmember = decode_floats(part["member"]), decode_floats(part["nonmember"])
                share = decode_floats(part["member_share"]) if "member_share" in part else None
                self.add_scores(member, nonmember, share, key=key, step=record.step)

    def scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The pooled ``(member, nonmember)`` scores, or ``None``."""
        if not self._member:
            return None
        return np.concatenate(self._member), np.concatenate(self._nonmember)

    def estimate(self, *, history=None, kind: str = "rdp", orders=None) -> dict[str, Any] | None:
        """The ``privacy_measured`` entries from the scores pooled so far (``None`` without).

        Args:
            history: the accountant's ``(σ, q, steps)`` entries, for ``epsilon_composed``.
            kind: the user's accountant type.
            orders: RDP orders.
        """
        if self._key is None or not self._member:
            return None
        from .bounds import gdp_epsilon
        from .tradeoff import auroc, roc_curve, tpr_at_fpr

        sigma = self._key[0]
        member, nonmember = np.concatenate(self._member), np.concatenate(self._nonmember)
        claimed = 1.0 / sigma
        out: dict[str, Any] = {
            "test": "oracle projection on lone (members) and empty (non-members) imprint bins",
            "trials_member": int(member.size),
            "trials_nonmember": int(nonmember.size),
            "confidence": f"{self.confidence:.0%}",  # text: not a chart
            "mu_step_claimed": claimed,
            "epsilon_step_claimed": gdp_epsilon(claimed, self.delta),
        }
        mu = gaussian_mu(member, nonmember, confidence=self.confidence)
        if mu is not None:
            out["mu_step_measured"] = mu[0]
            out["mu_step_ci"] = [mu[1], mu[2]]
        out["epsilon_lower"] = epsilon_lower_bound(
            member,
            nonmember,
            delta=self.delta,
            thresholds=tuple(claimed * t for t in THRESHOLD_GRID),
            confidence=self.confidence,
        )
        if member.size and nonmember.size:
            out["auroc"] = auroc(member, nonmember)
            out["tpr_at_fpr_0.001"] = tpr_at_fpr(member, nonmember, 1e-3)
            out["roc_points"] = roc_curve(member, nonmember)
        full = full_budget_mu(
            member, nonmember, np.concatenate(self._share), confidence=self.confidence
        )
        if full is not None:
            out["mu_step_full_budget"] = full[0]
            out["mu_step_full_budget_ci"] = [full[1], full[2]]
        if full is not None and history:
            composed = composed_epsilon(
                full[1], history=history, kind=kind, delta=self.delta, orders=orders
            )
            if composed is not None:
                out["epsilon_composed"] = composed
                out["epsilon_composed_note"] = COMPOSED_NOTE
        return out
