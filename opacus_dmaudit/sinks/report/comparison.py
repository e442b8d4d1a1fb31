"""``comparison.html``: the ladder across noise levels, then the numbers of every run.

First the same training images across the runs (a column per run, σ and ε, rows truth / raw
readout / DM; :mod:`.ladder`), so a reader sees where an image stops being recognisable; then
per run the claimed ε beside the measured one, success and identification beside their bounds,
against ε in a chart; then links to each run's report. Every string is escaped.
"""

from __future__ import annotations

import html
import json
import math
import os
import urllib.parse
from pathlib import Path

from ..logdir import private_mkdir, write_private
from ..summary import RunSummary, summary_from_json
from ..text import fmt
from .ladder import cell_caption, cell_pictures, ladder, run_sightings
from .page import PRIVATE_NOTICE, figure, head, table
from .plots import png, pyplot

__all__ = ["build_comparison"]

esc = html.escape

_COLUMNS = [
    "run",
    "σ",
    "ε (accountant)",
    "ε one step: measured ≥ / claimed",
    "found/lone images",
    "success raw / DM",
    "bound, one step",
    "identified raw / DM",
    "bound, identification",
    "verdict",
]


def _read(run_dir: Path) -> RunSummary:
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    return summary_from_json(report["summary"], report.get("verdict"))


def _pair(d: dict, fmt_spec: str = ".0%") -> str:
    return f"{fmt(d.get('raw'), fmt_spec)} / {fmt(d.get('dm'), fmt_spec)}"


def _row(name: str, s: RunSummary) -> list[str]:
    bounds = s.bounds or {}
    measured = s.measured
    return [
        name,
        fmt(s.noise_multiplier),
        fmt(s.epsilon),
        f"{fmt(measured.get('epsilon_lower'))} / {fmt(measured.get('epsilon_step_claimed'))}",
        f"{s.lone_found}/{s.lone_in_batch}",
        _pair(s.success_rate),
        fmt(bounds.get("single_step"), ".0%"),
        _pair(s.identification_rate),
        fmt(bounds.get("single_step_identification"), ".0%"),
        s.verdict.headline if s.verdict else "",
    ]


def _against_epsilon(summaries: list[RunSummary]) -> str | None:
    """Success and identification per run against ε, with the one-step bounds."""
    points = [s for s in summaries if s.epsilon is not None and math.isfinite(s.epsilon)]
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    eps = [max(s.epsilon, 1e-3) for s in points]
    series = [
        ("success DM", "o-", lambda s: s.success_rate.get("dm")),
        ("success raw", "s-", lambda s: s.success_rate.get("raw")),
        ("identified DM", "^-", lambda s: s.identification_rate.get("dm")),
        ("bound: success", "k--", lambda s: (s.bounds or {}).get("single_step")),
        (
            "bound: identification",
            "k:",
            lambda s: (s.bounds or {}).get("single_step_identification"),
        ),
    ]
    for label, style, get in series:
        ys = [get(s) for s in points]
        if any(y is not None for y in ys):
            ax.plot(eps, [math.nan if y is None else y for y in ys], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ε (accountant, log scale)")
    ax.set_ylabel("share of the batch")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return png(fig)


def _ladder_html(run_dirs: list[Path], summaries: list[RunSummary]) -> str:
    """The ladder section: per target image, a column per run."""
    seen = [run_sightings(d) for d in run_dirs]
    metric = next((label for _, label in seen if label), None)
    rows = ladder([s for s, _ in seen])
    if not rows:
        return "<p id='no-ladder'>No run saved an audited image to compare.</p>"
    exact = all(c.exact for _, cells in rows for c in cells if c.sighting is not None)
    note = (
        "The same training images in every run (matched by their pixels)."
        if exact
        else "Where a run did not see an image, its column shows the closest image that run saw,"
        " marked “closest equivalent”."
    )
    parts = [f"<p class='small'>{esc(note)}</p><div class='ladders'>"]
    for n, (_, cells) in enumerate(rows):
        cols = [
            _ladder_cell(cell, d.name, s, metric)
            for cell, d, s in zip(cells, run_dirs, summaries, strict=True)
        ]
        parts.append(
            f"<div class='ladder' id='ladder-{n}'><div class='rowlabels'>"
            "<span>truth</span><span>raw readout</span><span>DM</span></div>"
            + "".join(cols)
            + "</div>"
        )
    return "".join(parts) + "</div>"


def _ladder_cell(cell, name: str, s: RunSummary, metric: str | None) -> str:
    head_ = f"σ {fmt(s.noise_multiplier)} · ε {fmt(s.epsilon)}"
    pics = []
    for label, data in cell_pictures(cell):
        alt = f"{label}, {name}"
        if data is None:
            pics.append(f"<div class='pic empty' title='{esc(alt)}'>—</div>")
        else:
            pics.append(
                f"<img alt='{esc(alt)}' title='{esc(alt)}' src='data:image/png;base64,{data}'>"
            )
    lines = [esc(head_)] + [esc(x) for x in cell_caption(cell, metric)]
    cls = "rung" if cell.exact else "rung closest"
    return (
        f"<figure class='{cls}'>{''.join(pics)}"
        f"<figcaption><strong>{esc(name)}</strong><br>{'<br>'.join(lines)}</figcaption></figure>"
    )


def _href(target: Path, out_dir: Path) -> str:
    """A relative link that a browser cannot read as a URL scheme (``javascript:`` and the like)."""
    rel = os.path.relpath(target, out_dir)
    if not rel.startswith((".", "/")):
        rel = "./" + rel
    return html.escape(urllib.parse.quote(rel))


def _sentence(summaries: list[RunSummary]) -> str:
    eps = [s.epsilon for s in summaries if s.epsilon is not None]
    sig = [s.noise_multiplier for s in summaries if s.noise_multiplier is not None]
    if not sig:
        return f"{len(summaries)} runs compared."
    return (
        f"The same training images read out of {len(summaries)} runs, noise σ from "
        f"{fmt(min(sig))} to {fmt(max(sig))}"
        + (f" (ε from {fmt(min(eps))} to {fmt(max(eps))})." if eps else ".")
    )


def build_comparison(out_dir: str | os.PathLike, run_dirs: list[str | os.PathLike]) -> Path:
    """One page across runs (e.g. one per noise multiplier): the ladder, ε, success, bounds.

    Each run dir must hold a ``report.json`` (see :func:`~.build.build_report`); its image files
    feed the ladder. Writes ``out_dir/comparison.html`` (owner-only) and returns its path.
    """
    out_dir = private_mkdir(out_dir)
    dirs = [Path(d) for d in run_dirs]
    summaries = [_read(d) for d in dirs]
    rows = [_row(d.name, s) for d, s in zip(dirs, summaries, strict=True)]
    classes = ["fail" if s.verdict and s.verdict.status == "invalid" else "" for s in summaries]
    links = "".join(
        f"<li><a href='{_href(d / 'report.html', out_dir)}'>{esc(d.name)}: "
        f"σ = {esc(fmt(s.noise_multiplier))}</a></li>"
        for d, s in zip(dirs, summaries, strict=True)
    )
    chart = _against_epsilon(summaries)
    page = "\n".join(
        [
            head("opacus-dmaudit: runs compared"),
            f"<p class='notice' id='private-notice'>⚠ {esc(PRIVATE_NOTICE)}</p>",
            "<h1 id='headline'>What each noise level gives away</h1>",
            f"<p id='sentence'>{esc(_sentence(summaries))}</p>",
            f"<section id='ladder'>{_ladder_html(dirs, summaries)}</section>",
            "<h2>Every run: ε claimed and measured, success and identification beside the "
            "bounds</h2>",
            table(rows, _COLUMNS, classes),
            figure(
                "success and identification against ε",
                chart,
                "Share of each run's batches reconstructed (success) and identified, against the "
                "run's ε, with the one-step bounds no attack can beat at that ε.",
            )
            if chart
            else "",
            f"<h2>Reports</h2><ul>{links}</ul>",
            "</body></html>",
        ]
    )
    return write_private(out_dir / "comparison.html", page.encode("utf-8"))
