"""The report's charts (matplotlib, imported when a report is drawn): metrics, success, bounds."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence

import numpy as np

from ...record import AuditRecord, stages_of
from ...schema import METRICS, STAGES, parse_metric_key

__all__ = ["pyplot", "png", "plots"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    """A figure as base64 PNG text (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _series(records: Sequence[AuditRecord], get: Callable[[AuditRecord], object]) -> list[float]:
    out = []
    for r in records:
        v = get(r)
        out.append(float(v) if isinstance(v, int | float) and not isinstance(v, bool) else np.nan)
    return out


def _metric_plot(records: Sequence[AuditRecord], metric: str, stages: list[str]):
    """One metric against step and (where every ε is finite) against ε."""
    plt = pyplot()
    steps = [r.step for r in records]
    eps = _series(records, lambda r: r.epsilon)
    finite_eps = all(math.isfinite(e) for e in eps)
    fig, axes = plt.subplots(1, 2 if finite_eps else 1, figsize=(9 if finite_eps else 4.5, 3))
    axes = np.atleast_1d(axes)
    for stage in stages:
        ys = _series(records, lambda r, s=stage: r.mean(metric, s))
        axes[0].plot(steps, ys, marker="o", label=stage)
        if finite_eps:
            axes[1].plot(eps, ys, marker="o", label=stage)
    label = METRICS[metric].label
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(label)
    axes[0].legend()
    if finite_eps:
        axes[1].set_xlabel("ε")
        axes[1].set_ylabel(label)
    better = "higher" if METRICS[metric].higher_is_better else "lower"
    return (
        f"{label} against step and ε",
        f"Mean over the recovered images; {better} is closer to the real image.",
        png(fig),
    )


def _success_plot(records: Sequence[AuditRecord]):
    """Success and identification per audit, with this step's bounds and κ."""
    plt = pyplot()
    steps = [r.step for r in records]
    fig, ax = plt.subplots(figsize=(6, 3))
    for stage in stages_of(records, "success"):
        ys = _series(records, lambda r, s=stage: r.success.get(s))
        ax.plot(steps, ys, marker="o", label=f"success: {stage}")
    for stage in stages_of(records, "identification"):
        ys = _series(records, lambda r, s=stage: (r.identification or {}).get(s))
        ax.plot(steps, ys, marker="x", linestyle=":", label=f"identified: {stage}")
    for name in sorted({n for r in records for n in (r.bounds or {})}):
        ys = _series(records, lambda r, n=name: (r.bounds or {}).get(n))
        ax.plot(steps, ys, linestyle="--", label=f"bound: {name}")
    ax.plot(
        steps, _series(records, lambda r: r.kappa), linestyle=":", color="grey", label="baseline κ"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("share of the batch")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return (
        "Reconstruction success per audit and the bound for that step",
        "Success: the share of an audited batch reconstructed to the criterion, given the images "
        "were in that step. Identified: the share whose reconstruction is nearer to its own "
        "image than to every other image of the batch. Bounds: no attack on that one step can "
        "exceed them (same event; single_step for the criterion, single_step_identification for "
        "identification, where κ = 1/N is exact). κ: what a guess without the gradient gets at "
        "the criterion.",
        png(fig),
    )


def _run_bounds_plot(records: Sequence[AuditRecord]):
    plt = pyplot()
    steps = [r.step for r in records]
    fig, ax = plt.subplots(figsize=(6, 3))
    for name in sorted({n for r in records for n in (r.run_bounds or {})}):
        ys = _series(records, lambda r, n=name: (r.run_bounds or {}).get(n))
        style = ":" if "approx" in name or "clt" in name else "-"
        ax.plot(steps, ys, linestyle=style, marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("bound")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return (
        "Whole-run reconstruction bounds",
        "Another event than the per-audit success: an attack on a training image using every "
        "step so far (subsampled and composed). Dotted: an approximation, not a bound.",
        png(fig),
    )


def _roc_plot(record: AuditRecord):
    """The membership test's pooled ROC beside what µ-GDP allows at µ = 1/σ and at the measured
    µ (log axes: the low-FPR corner is where privacy is decided)."""
    import numpy as np

    from ...privacy.tradeoff import gaussian_tradeoff

    measured = record.privacy_measured or {}
    fpr = np.asarray(measured["roc_points"]["fpr"], dtype=float)
    tpr = np.asarray(measured["roc_points"]["tpr"], dtype=float)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    grid = np.geomspace(1e-4, 1.0, 200)
    sigma = record.noise_multiplier
    if sigma:
        ax.plot(
            grid,
            gaussian_tradeoff(1.0 / sigma, grid),
            "k-",
            lw=1,
            label=f"µ = 1/σ = {1 / sigma:.3g}",
        )
    mu = measured.get("mu_step_measured")
    if isinstance(mu, int | float) and np.isfinite(mu):
        ax.plot(grid, gaussian_tradeoff(mu, grid), "k--", lw=1, label=f"measured µ = {mu:.3g}")
    ok = fpr > 0
    ax.step(fpr[ok], tpr[ok], where="post", color="C3", label="membership test (pooled)")
    ax.plot(grid, grid, "k:", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(1e-4, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    return (
        "Membership test: ROC against the Gaussian trade-off",
        f"Pooled over the audits up to step {record.step} "
        f"({measured.get('trials_member', '?')} member and {measured.get('trials_nonmember', '?')} "
        "non-member scores). A µ-GDP mechanism keeps every test below its curve; the measured "
        "curve close to the µ = 1/σ line means the attack gets what the noise allows.",
        png(fig),
    )


def plots(records: Sequence[AuditRecord]) -> list[tuple[str, str, str]]:
    """``(title, caption, png)`` of every chart of the report."""
    pairs = {p for r in records for k in r.means if (p := parse_metric_key(k)) is not None}
    out = []
    for metric in [m for m in METRICS if any(p[0] == m for p in pairs)]:
        stages = [s for s in STAGES if (metric, s) in pairs]
        out.append(_metric_plot(records, metric, stages))
    if any(r.success for r in records):
        out.append(_success_plot(records))
    if any(r.run_bounds for r in records):
        out.append(_run_bounds_plot(records))
    roc = [r for r in records if isinstance((r.privacy_measured or {}).get("roc_points"), dict)]
    if roc:
        out.append(_roc_plot(roc[-1]))
    return out
