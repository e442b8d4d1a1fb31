"""``report.html``: the verdict, the checks, the run, every audit, charts and images, one page.

Built from typed parts (:class:`~..summary.RunSummary`, :class:`~opacus_dmaudit.record.AuditRecord`
list, the run file's configuration); every string is escaped (:mod:`.page`).
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
from .page import EXPLANATION, PRIVATE_NOTICE, figure, head, table

__all__ = ["ReportPage", "report_html"]

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


def _verdict(page: ReportPage) -> list[str]:
    s, v = page.summary, page.summary.verdict
    parts = []
    if s.failed_checks:
        parts.append(
            "<div class='fail' id='failed-checks'><strong>Failed checks: "
            + esc(", ".join(s.failed_checks))
            + ".</strong> This audit is invalid; see the checks below.</div>"
        )
    parts.append(f"<h2 id='headline'>{esc(v.headline)}</h2>")
    parts.append(f"<p id='verdict'>{esc(v.text)}</p>")
    return parts


def _checks(summary: RunSummary) -> str:
    if not summary.checks:
        return "<p>No checks were recorded (a log written before checks existed).</p>"
    rows, classes = [], []
    for name, c in summary.checks.items():
        rows.append([name, c.status, f"{c.passed}/{c.warned}/{c.failed}", c.detail or ""])
        classes.append("" if c.status == "pass" else c.status)
    return table(rows, ["check", "worst status", "pass/warn/fail", "detail"], classes)


def _run(page: ReportPage) -> list[str]:
    s = page.summary
    mode = s.mode or "imprint"
    rows = [["audit mode", MODES.get(mode, mode)]]
    for key, value in page.privacy.items():
        if isinstance(value, list):  # an interval
            value = " – ".join(fmt(v) for v in value)
        rows.append([key, fmt(value) if isinstance(value, float) else str(value)])
    parts = ["<h2>Run</h2>", table(rows, ["privacy parameter", "value"])]
    if s.epsilon_note:
        parts.append(f"<p class='warn'>{esc(s.epsilon_note)}</p>")
    return parts


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


def _audits(page: ReportPage) -> list[str]:
    rows = [_audit_row(r) for r in page.records]
    parts = [
        "<h2>Audits</h2>",
        table([r for r, _ in rows], _AUDIT_COLUMNS, [c for _, c in rows]),
    ]
    s = page.summary
    if s.success_criterion is not None:
        parts.append(
            f"<p>Success criterion: {esc(s.success_criterion.text)}; baseline κ = "
            f"{esc(fmt(s.kappa))} (measured κ̂ = {esc(fmt(s.kappa_baseline))}, 1/N = "
            f"{esc(fmt(s.kappa_uniform))}).</p>"
        )
    return parts


def _images(grids: ImageGrids) -> list[str]:
    parts = []
    if grids.best or grids.worst:
        parts.append(f"<h2>Best and worst reconstructions (by {esc(grids.metric or '')})</h2>")
        parts.append(figure("best reconstructions", grids.best, "Best, left to right."))
        parts.append(figure("worst reconstructions", grids.worst, "Worst, left to right."))
    if grids.missed:
        parts.append("<h2>Lone images the attack did not detect</h2>")
        parts.append(
            figure(
                "missed lone images",
                grids.missed,
                "Each column: a training image that sat alone in its bin, and the raw readout of "
                "that bin, which did not rise above the noise.",
            )
        )
    if grids.skipped:
        parts.append(
            "<p class='warn'>Unreadable image files were left out (steps "
            + esc(", ".join(map(str, grids.skipped)))
            + ").</p>"
        )
    return parts


def _problems(problems: list[str]) -> list[str]:
    if not problems:
        return []
    items = "".join(f"<li>{esc(p)}</li>" for p in problems)
    return [
        "<div class='warn' id='unread-records'><strong>Records that could not be read were "
        f"left out ({len(problems)}):</strong><ul>{items}</ul></div>"
    ]


def report_html(page: ReportPage) -> str:
    """The whole page."""
    parts = [
        head("opacus-dmaudit report"),
        f"<p class='notice' id='private-notice'>⚠ {esc(PRIVATE_NOTICE)}</p>",
        "<h1>Visual privacy audit</h1>",
        *_problems(page.problems),
        *_verdict(page),
        "<h2>Checks</h2>" + _checks(page.summary),
        *_run(page),
        *_audits(page),
    ]
    for title, caption, png in page.plots:
        parts.append(f"<h3>{esc(title)}</h3>" + figure(title, png, caption))
    parts += _images(page.grids)
    parts.append("<h2>What this audit can and cannot show</h2>" + EXPLANATION)
    parts.append(
        "<h2>Configuration</h2><pre>"
        + esc(json.dumps(page.config, indent=2, default=str))
        + "</pre>"
    )
    parts.append("<h2>Versions</h2><pre>" + esc(json.dumps(page.versions, indent=2)) + "</pre>")
    parts.append(f"<p><small>Generated {esc(page.generated)}.</small></p></body></html>")
    return "\n".join(parts)
