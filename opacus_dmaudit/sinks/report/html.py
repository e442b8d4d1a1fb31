"""``report.html``: the verdict and the images first, then the evidence, collapsible.

The first screen (1280×800) holds a one-sentence verdict, the key numbers (ε, the measured
numbers where the record has them) and the images: truth / raw readout / DM side by side for the
best and worst audited images with their scores and bins, unfaithful DM panels marked. A run in
which nothing was recovered shows missed lone images there instead (truth beside raw readout: the
reader sees why). Checks, charts, bounds, every audit and the configuration follow in
``<details>``. Built from typed parts (:class:`~..summary.RunSummary`,
:class:`~opacus_dmaudit.record.AuditRecord` list, the run file's configuration); every string is
escaped (:mod:`.page`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...checks.entries import worst_status
from ...record import AuditRecord
from ...schema import MODES
from ..summary import RunSummary
from ..text import fmt
from .images import ImageGrids
from .page import EXPLANATION, PRIVATE_NOTICE, details, figure, head, key_numbers, panels, table

__all__ = ["ReportPage", "report_html", "headline_numbers"]

esc = html.escape


@dataclass
class ReportPage:
    """Everything the page shows."""

    summary: RunSummary
    records: Sequence[AuditRecord]
    privacy: dict[str, Any]
    config: dict[str, Any]
    versions: dict[str, Any]
    generated: str
    plots: list[tuple[str, str, str]]
    grids: ImageGrids
    problems: list[str]


def _pct(value: float | None) -> str:
    return fmt(value, ".0%")


def headline_numbers(summary: RunSummary) -> list[tuple[str, str, str]]:
    """The key numbers of a run: ``(label, value, note)`` for the top of a page."""
    s = summary
    eps_note = "no meaningful guarantee" if s.epsilon_note else f"at δ = {fmt(s.delta)}"
    out = [("ε (accountant)", fmt(s.epsilon), eps_note)]
    lower = s.measured.get("epsilon_lower")
    if lower is not None:  # the membership test's lower bound on one step's ε
        claimed = s.measured.get("epsilon_step_claimed")
        out.append(("ε measured, one step", f"≥ {fmt(lower)}", f"claimed {fmt(claimed)} (95%)"))
    out.append(("noise σ", fmt(s.noise_multiplier), f"µ per step {fmt(s.mu_step)}"))
    if s.lone_in_batch or s.mode != "mechanism":
        out.append(("lone images found", f"{s.lone_found} / {s.lone_in_batch}", _audits(s)))
    stage = "dm" if "dm" in s.success_rate else "raw"
    if stage in s.success_rate:
        bound = (s.bounds or {}).get("single_step")
        out.append(
            (
                f"of the batch reconstructed ({stage})",
                _pct(s.success_rate.get(stage)),
                f"bound {_pct(bound)}",
            )
        )
    if stage in s.identification_rate:
        bound = (s.bounds or {}).get("single_step_identification")
        out.append(
            (
                f"of the batch identified ({stage})",
                _pct(s.identification_rate.get(stage)),
                f"bound {_pct(bound)}",
            )
        )
    return out


def _audits(s: RunSummary) -> str:
    if not s.audits:
        return "no audit"
    return f"{s.audits} audit{'s' if s.audits != 1 else ''}, steps {s.first_step}–{s.last_step}"


def _top(page: ReportPage) -> list[str]:
    """The first screen: notice, failed checks, the verdict's sentence, the numbers, images."""
    s, v = page.summary, page.summary.verdict
    status = v.status if v is not None else "unknown"
    parts = [f"<p class='notice' id='private-notice'>⚠ {esc(PRIVATE_NOTICE)}</p>"]
    parts += _problems(page.problems)
    if s.failed_checks:
        parts.append(
            "<div class='fail' id='failed-checks'><strong>Failed checks: "
            + esc(", ".join(s.failed_checks))
            + ".</strong> This audit is invalid; see the checks below.</div>"
        )
    headline = v.headline if v is not None else "No verdict."
    parts.append(f"<h1 id='headline' class='verdict {esc(status)}'>{esc(headline)}</h1>")
    parts.append(key_numbers(headline_numbers(s)))
    parts += _images(page.grids)
    return parts


def _images(grids: ImageGrids) -> list[str]:
    parts = ["<section id='images'>"]
    if grids.best or grids.worst:
        parts.append(f"<h2>Best and worst reconstructions (by {esc(grids.metric or '')})</h2>")
        parts.append(panels("best", "best", grids.best))
        parts.append(panels("worst", "worst", grids.worst))
    elif grids.missed:  # nothing recovered: show why
        parts.append(_missed_heading())
        parts.append(panels("missed", "missed", grids.missed))
    else:
        parts.append("<p id='no-images'>No audited image was saved (see the audits below).</p>")
    if grids.skipped:
        parts.append(
            "<p class='warn'>Unreadable image files were left out (steps "
            + esc(", ".join(map(str, grids.skipped)))
            + ").</p>"
        )
    parts.append("</section>")
    return parts


def _missed_heading() -> str:
    return (
        "<h2>Lone images the attack did not detect</h2><p class='small'>Each panel: a training "
        "image that sat alone in its bin, and the raw readout of that bin, which did not rise "
        "above the noise.</p>"
    )


def _checks(summary: RunSummary) -> str:
    if not summary.checks:
        return "<p>No checks were recorded (a log written before checks existed).</p>"
    rows, classes = [], []
    for name, c in summary.checks.items():
        rows.append([name, c.status, f"{c.passed}/{c.warned}/{c.failed}", c.detail or ""])
        classes.append("" if c.status == "pass" else c.status)
    return table(rows, ["check", "worst status", "pass/warn/fail", "detail"], classes)


def _checks_title(summary: RunSummary) -> str:
    statuses = [c.status for c in summary.checks.values()]
    counts = {k: statuses.count(k) for k in ("pass", "warn", "fail")}
    return (
        f"Checks: {counts['pass']} passed, {counts['warn']} warned, {counts['fail']} failed"
        if statuses
        else "Checks"
    )


def _run(page: ReportPage) -> str:
    s = page.summary
    mode = s.mode or "imprint"
    rows = [["audit mode", MODES.get(mode, mode)]]
    for key, value in page.privacy.items():
        if isinstance(value, list):  # an interval
            value = " – ".join(fmt(v) for v in value)
        rows.append([key, fmt(value) if isinstance(value, float) else str(value)])
    out = table(rows, ["privacy parameter", "value"])
    if s.epsilon_note:
        out += f"<p class='warn'>{esc(s.epsilon_note)}</p>"
    return out


_AUDIT_COLUMNS = [
    "step",
    "ε",
    "found/lone images",
    "success raw",
    "success DM",
    "prior faithful",
    "bound, this step",
    "κ",
    "checks",
]


def _audit_row(r: AuditRecord) -> tuple[list[str], str]:
    status = worst_status(c.to_json() for c in r.checks) if r.checks else "n/a"
    counts = r.counts
    found = f"{counts.lone_found}/{counts.lone_in_batch}" if counts else "n/a/n/a"
    row = [
        str(r.step),
        fmt(r.epsilon),
        found,
        fmt(r.success.get("raw"), ".2f"),
        fmt(r.success.get("dm"), ".2f"),
        fmt((r.prior_fit or {}).get("faithful_share"), ".2f"),
        fmt((r.bounds or {}).get("single_step"), ".3g"),
        fmt(r.kappa, ".3g"),
        status,
    ]
    return row, "" if status in ("pass", "n/a") else status


def _audits_table(page: ReportPage) -> str:
    rows = [_audit_row(r) for r in page.records]
    out = table([r for r, _ in rows], _AUDIT_COLUMNS, [c for _, c in rows])
    s = page.summary
    if s.success_criterion is not None:
        out += (
            f"<p>Success criterion: {esc(s.success_criterion.text)}; baseline κ = "
            f"{esc(fmt(s.kappa))} (measured κ̂ = {esc(fmt(s.kappa_baseline))}, 1/N = "
            f"{esc(fmt(s.kappa_uniform))}).</p>"
        )
    return out


def _problems(problems: list[str]) -> list[str]:
    if not problems:
        return []
    items = "".join(f"<li>{esc(p)}</li>" for p in problems)
    return [
        "<div class='warn' id='unread-records'><strong>Records that could not be read were "
        f"left out ({len(problems)}):</strong><ul>{items}</ul></div>"
    ]


def _evidence(page: ReportPage) -> list[str]:
    """Everything below the first screen, each part collapsible."""
    s, v = page.summary, page.summary.verdict
    failed = bool(s.failed_checks)
    charts = "".join(
        f"<h3>{esc(title)}</h3>" + figure(title, png, caption) for title, caption, png in page.plots
    )
    parts = [
        details("why", "Why this verdict", f"<p id='verdict'>{esc(v.text if v else '')}</p>"),
        details("checks", _checks_title(s), _checks(s), open_=failed),
        details("privacy", "Privacy numbers and bounds", _run(page)),
        details("audits", f"Every audit ({len(page.records)})", _audits_table(page)),
    ]
    if charts:
        parts.append(details("charts", "Charts: quality, success and bounds per audit", charts))
    grids = page.grids
    if grids.missed and (grids.best or grids.worst):
        body = _missed_heading() + panels("missed", "missed", grids.missed)
        parts.append(details("missed", "Lone images the attack did not detect", body))
    parts.append(details("explanation", "What this audit can and cannot show", EXPLANATION))
    config = "<pre>" + esc(json.dumps(page.config, indent=2, default=str)) + "</pre>"
    parts.append(details("configuration", "Configuration", config))
    versions = "<pre>" + esc(json.dumps(page.versions, indent=2)) + "</pre>"
    parts.append(details("versions", "Versions", versions))
    return parts


def report_html(page: ReportPage) -> str:
    """The whole page."""
    parts = [head("opacus-dmaudit report"), *_top(page), *_evidence(page)]
    parts.append(f"<p><small>Generated {esc(page.generated)}.</small></p></body></html>")
    return "\n".join(parts)
