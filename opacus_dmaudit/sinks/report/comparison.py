"""``comparison.html``: several runs (e.g. one per noise multiplier) on one page."""

from __future__ import annotations

import html
import json
import os
import urllib.parse
from pathlib import Path

from ..logdir import private_mkdir, write_private
from ..summary import RunSummary, summary_from_json
from ..text import fmt
from .page import PRIVATE_NOTICE, figure, head, table
from .plots import png, pyplot

__all__ = ["build_comparison"]

_COLUMNS = [
    "σ",
    "final ε",
    "found/lone images",
    "success raw",
    "success DM",
    "bound, one step",
    "LPIPS raw",
    "LPIPS DM",
    "verdict",
]


def _read(run_dir: Path) -> RunSummary:
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    return summary_from_json(report["summary"], report.get("verdict"))


def _row(s: RunSummary) -> list[str]:
    return [
        fmt(s.noise_multiplier),
        fmt(s.epsilon),
        f"{s.lone_found}/{s.lone_in_batch}",
        fmt(s.success_rate.get("raw"), ".2f"),
        fmt(s.success_rate.get("dm"), ".2f"),
        fmt((s.bounds or {}).get("single_step"), ".3g"),
        fmt(s.means.get("lpips_raw"), ".3f"),
        fmt(s.means.get("lpips_dm"), ".3f"),
        s.verdict.headline if s.verdict else "",
    ]


def _success_plot(summaries: list[RunSummary]) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sig = [s.noise_multiplier or 0 for s in summaries]
    for stage in ("raw", "dm"):
        ax.plot(sig, [s.success_rate.get(stage) for s in summaries], "o-", label=f"success {stage}")
    bounds = [(s.bounds or {}).get("single_step") for s in summaries]
    ax.plot(sig, bounds, "k--", label="ReRo bound, one step")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("noise multiplier σ")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return png(fig)


def _href(target: Path, out_dir: Path) -> str:
    """A relative link that a browser cannot read as a URL scheme (``javascript:`` and the like)."""
    rel = os.path.relpath(target, out_dir)
    if not rel.startswith((".", "/")):
        rel = "./" + rel
    return html.escape(urllib.parse.quote(rel))


def build_comparison(out_dir: str | os.PathLike, run_dirs: list[str | os.PathLike]) -> Path:
    """One page across runs (e.g. one per noise multiplier): ε, success, bounds, quality, links.

    Each run dir must hold a ``report.json`` (see :func:`~.build.build_report`). Writes
    ``out_dir/comparison.html`` (owner-only) and returns its path.
    """
    out_dir = private_mkdir(out_dir)
    runs = [(Path(d), _read(Path(d))) for d in run_dirs]
    summaries = [s for _, s in runs]
    rows = [_row(s) for s in summaries]
    classes = ["fail" if s.verdict and s.verdict.status == "invalid" else "" for s in summaries]
    links = "".join(
        f"<li><a href='{_href(d / 'report.html', out_dir)}'>"
        f"σ = {html.escape(fmt(s.noise_multiplier))}</a></li>"
        for d, s in runs
    )
    page = "\n".join(
        [
            head("opacus-dmaudit: runs compared"),
            f"<p class='notice'>⚠ {html.escape(PRIVATE_NOTICE)}</p>",
            "<h1>Runs compared</h1>",
            table(rows, _COLUMNS, classes),
            figure(
                "success against noise",
                _success_plot(summaries),
                "Mean success per audit against σ.",
            ),
            f"<h2>Reports</h2><ul>{links}</ul>",
            "</body></html>",
        ]
    )
    return write_private(out_dir / "comparison.html", page.encode("utf-8"))
