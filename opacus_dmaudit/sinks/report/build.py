"""The audit report: ``report.json`` and one self-contained ``report.html`` from a log directory.

Works on whatever the log holds — a finished run, or one that crashed (a torn last line of
``audit.jsonl`` is skipped, an unreadable image file is left out and said so). Inputs, all under
the log dir (:mod:`.logdir`): ``audit.jsonl``, ``run.json`` and ``images/step_*.npz`` (loaded
without pickle). The conclusions come from :mod:`.summary`, the record layout from :mod:`.schema`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...schema import METRICS, MODES, STAGES, parse_metric_key, upgrade_record
from ..audit_log import read_audit_log
from ..logdir import LogDir, load_images, package_versions, private_mkdir, write_private
from ..summary import fmt, summarize, verdict

__all__ = ["build_report", "build_comparison", "load_audit_images", "PRIVATE_NOTICE"]

logger = logging.getLogger(__name__)

PRIVATE_NOTICE = (
    "This report contains images of private training data (true training images and their "
    "reconstructions). Keep it where only people allowed to see the training data can read it."
)

#: Backwards-compatible name of :func:`~opacus_dmaudit.logdir.load_images`.
load_audit_images = load_images


# -- plots and images ---------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _series(records, get) -> list[float]:
    out = []
    for r in records:
        v = get(r)
        out.append(float(v) if isinstance(v, int | float) and not isinstance(v, bool) else np.nan)
    return out


def _plots(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """``(title, caption, png)`` of every chart of the report."""
    plt = _pyplot()
    out = []
    steps = [r["step"] for r in records]
    eps = _series(records, lambda r: r.get("epsilon"))
    finite_eps = all(math.isfinite(e) for e in eps)
    pairs = {parse_metric_key(k) for r in records for k in (r.get("summary") or {})} - {None}
    for metric in [m for m in METRICS if any(p[0] == m for p in pairs)]:
        fig, axes = plt.subplots(1, 2 if finite_eps else 1, figsize=(9 if finite_eps else 4.5, 3))
        axes = np.atleast_1d(axes)
        for stage in [s for s in STAGES if (metric, s) in pairs]:
            ys = _series(records, lambda r, k=f"{metric}_{stage}": (r.get("summary") or {}).get(k))
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
        out.append(
            (
                f"{label} against step and ε",
                f"Mean over the recovered images; {better} is closer to the real image.",
                _png(fig),
            )
        )
    if any(r.get("success") for r in records):
        fig, ax = plt.subplots(figsize=(6, 3))
        for stage in [s for s in STAGES if any(s in (r.get("success") or {}) for r in records)]:
            ys = _series(records, lambda r, s=stage: (r.get("success") or {}).get(s))
            ax.plot(steps, ys, marker="o", label=f"success: {stage}")
        identified = [
            s for s in STAGES if any(s in (r.get("identification") or {}) for r in records)
        ]
        for stage in identified:
            ys = _series(records, lambda r, s=stage: (r.get("identification") or {}).get(s))
            ax.plot(steps, ys, marker="x", linestyle=":", label=f"identified: {stage}")
        for name in sorted({n for r in records for n in (r.get("bounds") or {})}):
            ys = _series(records, lambda r, n=name: (r.get("bounds") or {}).get(n))
            ax.plot(steps, ys, linestyle="--", label=f"bound: {name}")
        kappa = _series(records, lambda r: r.get("kappa"))
        ax.plot(steps, kappa, linestyle=":", color="grey", label="baseline κ")
        ax.set_xlabel("step")
        ax.set_ylabel("share of the batch")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        out.append(
            (
                "Reconstruction success per audit and the bound for that step",
                "Success: the share of an audited batch reconstructed to the criterion, given "
                "the images were in that step. Identified: the share whose reconstruction is "
                "nearer to its own image than to every other image of the batch. Bounds: no "
                "attack on that one step can exceed them (same event; single_step for the "
                "criterion, single_step_identification for identification, where κ = 1/N is "
                "exact). κ: what a guess without the gradient gets at the criterion.",
                _png(fig),
            )
        )
    if any(r.get("run_bounds") for r in records):
        fig, ax = plt.subplots(figsize=(6, 3))
        for name in sorted({n for r in records for n in (r.get("run_bounds") or {})}):
            ys = _series(records, lambda r, n=name: (r.get("run_bounds") or {}).get(n))
            style = ":" if "approx" in name or "clt" in name else "-"
            ax.plot(steps, ys, linestyle=style, marker=".", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("bound")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        out.append(
            (
                "Whole-run reconstruction bounds",
                "Another event than the per-audit success: an attack on a training image using "
                "every step so far (subsampled and composed). Dotted: an approximation, not a "
                "bound.",
                _png(fig),
            )
        )
    return out


def _grid_png(
    columns: list[list[np.ndarray | None]], row_names: list[str], captions: list[str]
) -> str:
    """One PNG of images in a grid (a column per sample, a row per stage) with captions."""
    plt = _pyplot()
    nrow, ncol = len(row_names), len(columns)
    shapes = [img.shape for col in columns for img in col if img is not None]
    h, w = max(shape[1] for shape in shapes), max(shape[2] for shape in shapes)
    pad = max(2, h // 14)
    mosaic = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for c, col in enumerate(columns):
        for r in range(nrow):
            img = col[r]
            if img is None:
                continue
            rgb = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            mosaic[top : top + img.shape[1], left : left + img.shape[2]] = np.moveaxis(rgb, 0, -1)
    fig, ax = plt.subplots(figsize=(1.15 * ncol + 0.9, 1.1 * nrow + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks(
        [pad + c * (w + pad) + w / 2 for c in range(ncol)], captions, fontsize=6, linespacing=1.1
    )
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(nrow)], row_names, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return _png(fig)


def _scored_metric(records) -> tuple[str, str] | None:
    """The (metric, stage) that ranks reconstructions: the success metric, at the DM stage if any."""
    crit = next(
        (r.get("success_criterion") for r in reversed(records) if r.get("success_criterion")), {}
    )
    stage = "dm" if any(r.get("denoiser") for r in records) else "raw"
    candidates = [crit.get("metric")] + [m for m in ("lpips", "ssim", "psnr", "mse")]
    for metric in candidates:
        if metric in METRICS and any(
            f"{metric}_{stage}" in im for r in records for im in r["images"]
        ):
            return metric, stage
    return None


def _caption(step: int, im: dict[str, Any], metric: str) -> str:
    parts = [f"step {step} bin {im.get('bin')}"]
    for stage in ("raw", "dm"):
        value = im.get(f"{metric}_{stage}")
        if value is not None:
            parts.append(f"{stage} {METRICS[metric].label} {fmt(value, '.3f')}")
    if im.get("collision") or (im.get("true_count") or 1) > 1:
        parts.append(f"blend of {im.get('true_count')}")
    if im.get("dm_faithful") is False:  # prior_fit: at this noise level the prior guesses
        parts.append("DM: prior unfaithful")
    return "\n".join(parts)


def _image_grids(logdir: LogDir, records, *, count: int = 8) -> dict[str, Any]:
    """Best and worst scored reconstructions across audits, and missed lone images, as PNGs."""
    out: dict[str, Any] = {"skipped": []}
    cache: dict[int, dict[str, np.ndarray] | None] = {}

    def arrays(step: int):
        if step not in cache:
            cache[step] = logdir.load_images(step)
            if cache[step] is None and logdir.image_file(step).exists():
                out["skipped"].append(step)
        return cache[step]

    ranked = _scored_metric(records)
    if ranked is not None:
        metric, stage = ranked
        items = []
        for r in records:
            scored = [im for im in r["images"] if f"{metric}_raw" in im]
            for j, im in enumerate(scored):
                value = im.get(f"{metric}_{stage}")
                if value is not None and math.isfinite(value):
                    items.append((value, r["step"], j, im))
        items.sort(key=lambda it: it[0], reverse=METRICS[metric].higher_is_better)

        def grid(selection):
            cols, caps = [], []
            for _, step, j, im in selection:
                data = arrays(step)
                if data is None or "truth" not in data or j >= data["truth"].shape[0]:
                    continue
                cols.append([data[k][j] if k in data else None for k in ("truth", "raw", "dm")])
                caps.append(_caption(step, im, metric))
            if not cols:
                return None
            return _grid_png(cols, ["truth", "raw readout", "DM"], caps)

        if items:
            out["metric"] = f"{METRICS[metric].label} ({stage})"
            out["best"] = grid(items[:count])
            out["worst"] = grid(items[-count:][::-1])
    missed_cols, missed_caps = [], []
    for r in records:
        for j, m in enumerate(r.get("missed") or []):
            if len(missed_cols) >= count:
                break
            data = arrays(r["step"])
            if data is None or "missed_truth" not in data or j >= data["missed_truth"].shape[0]:
                continue
            missed_cols.append([data["missed_truth"][j], data["missed_raw"][j]])
            missed_caps.append(
                f"step {r['step']} bin {m.get('bin')}\nnoise std {fmt(m.get('noise_std'), '.2g')}"
            )
    if missed_cols:
        out["missed"] = _grid_png(missed_cols, ["truth", "raw readout"], missed_caps)
    return out


EXPLANATION = """
<p>The auditor plays the strongest realistic attacker against DP-SGD: the model's first layer is an
<em>imprint layer</em> that routes each training image into the gradient of one row of a linear
layer. From the privatised (clipped and noised) gradient of a step, each singly-occupied row gives
the image back plus Gaussian noise whose size the noise multiplier σ sets. The <em>raw readout</em>
is that noisy image; the <em>DM reconstruction</em> denoises it with a diffusion model trained on
public images of the same kind; the <em>clean</em> stage reads the clipped gradient before noise
(what an attacker would get without DP). In <em>shadow</em> mode the imprint layer is simulated on
the real batch at this run's clipping bound and noise; the model itself has none.</p>
<p><strong>What it can show:</strong> whether training images are recognisable from one step's
privatised gradient, for this model, data and noise level; how this compares with the formal
reconstruction-robustness (ReRo) bounds; whether the DP mechanism matches what the accountant
assumes (the checks).</p>
<p><strong>What it cannot show:</strong> that a run is private. A failed reconstruction is evidence
about this attack, not proof; the bounds are the guarantee. And <strong>at high noise the DM output
is a plausible sample of the prior, not evidence of leakage</strong>: a crisp digit may be a digit
the prior invented. Judge reconstructions by their agreement with the truth (the metrics), never by
how realistic they look.</p>
<p>The bounds: for a baseline κ (the success rate at the same criterion of the best guess without
the gradient) no attack can succeed with probability above the bound. The per-audit bounds are
for the step the audit reads (one Gaussian mechanism), the same event as the per-audit success
rate; the whole-run bounds cover an attack that may use every step so far, another event.</p>
"""


def _head(title: str) -> str:
    """Start of a self-contained page: no external resource, inline style."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:64em;margin:2em auto;padding:0 1em}"
        ".notice{background:#fff3cd;border:2px solid #c90;padding:.8em;font-weight:bold}"
        ".fail{background:#f8d7da;border:2px solid #b02a37;padding:.8em;color:#58151c}"
        ".warn{background:#fff8e1;border:1px solid #c90;padding:.5em}"
        "td.fail,td.warn{padding:2px 6px}"
        "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #bbb;padding:2px 6px}"
        "img{max-width:100%}figcaption{font-size:.85em;color:#444}</style></head><body>"
    )


def _table(rows: list[list[str]], header: list[str], classes: list[str] | None = None) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f" class='{classes[i]}'" if classes and classes[i] else ""
        body.append(
            "<tr" + cls + ">" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(title: str, png: str | None, caption: str = "") -> str:
    if png is None:
        return ""
    esc = html.escape
    return (
        f"<figure><img alt='{esc(title)}' src='data:image/png;base64,{png}'>"
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _checks_html(summary: dict[str, Any]) -> str:
    checks = summary.get("checks") or {}
    if not checks:
        return "<p>No checks were recorded (a log written before checks existed).</p>"
    rows, classes = [], []
    for name, c in checks.items():
        rows.append(
            [name, c["status"], f"{c['pass']}/{c['warn']}/{c['fail']}", c.get("detail") or ""]
        )
        classes.append("" if c["status"] == "pass" else c["status"])
    return _table(rows, ["check", "worst status", "pass/warn/fail", "detail"], classes)


def _html(report: dict[str, Any], plots, grids) -> str:
    esc = html.escape
    s = report["summary"]
    v = report["verdict"]
    parts = [
        _head("opacus-dmaudit report"),
        f"<p class='notice' id='private-notice'>⚠ {esc(PRIVATE_NOTICE)}</p>",
        "<h1>Visual privacy audit</h1>",
    ]
    failed = [name for name, c in (s.get("checks") or {}).items() if c["status"] == "fail"]
    if failed:
        parts.append(
            "<div class='fail' id='failed-checks'><strong>Failed checks: "
            + esc(", ".join(failed))
            + ".</strong> This audit is invalid; see the checks below.</div>"
        )
    parts.append(f"<h2 id='headline'>{esc(v['headline'])}</h2>")
    parts.append(f"<p id='verdict'>{esc(v['text'])}</p>")
    parts.append("<h2>Checks</h2>" + _checks_html(s))
    parts.append("<h2>Run</h2>")
    mode = s.get("mode") or "imprint"
    privacy_rows = [["audit mode", MODES.get(mode, mode)]]
    for key, value in report["privacy"].items():
        if isinstance(value, list):  # an interval
            value = " – ".join(fmt(v) for v in value)
        privacy_rows.append([key, fmt(value) if isinstance(value, float) else str(value)])
    parts.append(_table(privacy_rows, ["privacy parameter", "value"]))
    if s.get("epsilon_note"):
        parts.append(f"<p class='warn'>{esc(s['epsilon_note'])}</p>")
    audit_rows, audit_classes = [], []
    for r in report["audits"]:
        succ = r.get("success") or {}
        bounds = r.get("bounds") or {}
        statuses = [c["status"] for c in r.get("checks") or []]
        status = "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"
        audit_rows.append(
            [
                str(r["step"]),
                fmt(r.get("epsilon")),
                f"{r.get('found_singletons', 'n/a')}/{r.get('true_singletons', 'n/a')}",
                fmt(succ.get("raw"), ".2f"),
                fmt(succ.get("dm"), ".2f"),
                fmt((r.get("prior_fit") or {}).get("faithful_share"), ".2f"),
                fmt(bounds.get("single_step"), ".3g"),
                fmt(r.get("kappa"), ".3g"),
                status if statuses else "n/a",
            ]
        )
        audit_classes.append("" if status == "pass" or not statuses else status)
    parts.append("<h2>Audits</h2>")
    parts.append(
        _table(
            audit_rows,
            [
                "step",
                "ε",
                "found/lone images",
                "success raw",
                "success DM",
                "prior faithful",
                "bound, this step",
                "κ",
                "checks",
            ],
            audit_classes,
        )
    )
    crit = s.get("success_criterion") or {}
    if crit:
        metric = str(crit.get("metric"))
        label = METRICS[metric].label if metric in METRICS else metric
        parts.append(
            f"<p>Success criterion: {esc(label)} {'≥' if crit.get('higher_is_better') else '≤'} "
            f"{esc(fmt(crit.get('threshold')))}; baseline κ = {esc(fmt(s.get('kappa')))} "
            f"(measured κ̂ = {esc(fmt(s.get('kappa_baseline')))}, 1/N = "
            f"{esc(fmt(s.get('kappa_uniform')))}).</p>"
        )
    for title, caption, png in plots:
        parts.append(f"<h3>{esc(title)}</h3>" + _figure(title, png, caption))
    if grids.get("best") or grids.get("worst"):
        parts.append(f"<h2>Best and worst reconstructions (by {esc(grids['metric'])})</h2>")
        parts.append(_figure("best reconstructions", grids.get("best"), "Best, left to right."))
        parts.append(_figure("worst reconstructions", grids.get("worst"), "Worst, left to right."))
    if grids.get("missed"):
        parts.append("<h2>Lone images the attack did not detect</h2>")
        parts.append(
            _figure(
                "missed lone images",
                grids["missed"],
                "Each column: a training image that sat alone in its bin, and the raw readout of "
                "that bin, which did not rise above the noise.",
            )
        )
    if grids.get("skipped"):
        parts.append(
            "<p class='warn'>Unreadable image files were left out (steps "
            + esc(", ".join(map(str, grids["skipped"])))
            + ").</p>"
        )
    parts.append("<h2>What this audit can and cannot show</h2>" + EXPLANATION)
    parts.append(
        "<h2>Configuration</h2><pre>"
        + esc(json.dumps(report["config"], indent=2, default=str))
        + "</pre>"
    )
    parts.append(
        "<h2>Versions</h2><pre>" + esc(json.dumps(report["versions"], indent=2)) + "</pre>"
    )
    parts.append(f"<p><small>Generated {esc(report['generated'])}.</small></p></body></html>")
    return "\n".join(parts)


def _read_run(logdir: LogDir) -> dict[str, Any]:
    path = logdir.run_file
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        logger.warning(
            "%s is not valid JSON (%s); the report leaves the configuration out", path, err
        )
        return {}
    if not isinstance(run, dict):
        logger.warning("%s is not a JSON object; the report leaves the configuration out", path)
        return {}
    return run


def build_report(log_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` (owner-only) into ``log_dir``; returns both paths.

    Raises:
        FileNotFoundError: ``log_dir`` holds no ``audit.jsonl``.
        AuditLogError: the log is not an audit log (the message names the line).
        PermissionError: the folder cannot be read or written.
    """
    logdir = LogDir(log_dir)
    if not logdir.path.is_dir():
        raise FileNotFoundError(f"{logdir.path} is not a folder: give an auditor's log_dir")
    if not os.access(logdir.path, os.R_OK | os.X_OK):
        raise PermissionError(f"cannot read {logdir.path}")
    if not logdir.audit_log.is_file():
        runs = sorted(p.parent.name for p in logdir.path.glob("*/audit.jsonl"))
        hint = (
            f" It holds runs: {', '.join(runs)} (the demo's --out holds one per σ); give those"
            if runs
            else " Is it an auditor's log_dir?"
        )
        raise FileNotFoundError(f"{logdir.path} has no audit.jsonl.{hint}")
    records = [upgrade_record(r) for r in read_audit_log(logdir.audit_log)]
    run = _read_run(logdir)
    summary = summarize(records)
    report = {
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "notice": PRIVATE_NOTICE,
        "config": run.get("config", {}),
        "versions": run.get("versions") or package_versions(),
        "privacy": {
            "noise_multiplier": summary.get("noise_multiplier"),
            "mu_step": summary.get("mu_step"),
            "sample_rate": summary.get("sample_rate"),
            "delta": summary.get("delta"),
            "steps_audited_through": summary.get("last_step"),
            "final_epsilon": summary.get("final_epsilon"),
            "epsilon_accountant": summary.get("epsilon_accountant"),
            # the empirical estimates are of ONE step given the sample's inclusion (.empirical)
            "epsilon_lower (measured, one step, 95%)": summary.get("epsilon_lower"),
            "epsilon of one step at mu_step (claimed)": summary.get("epsilon_step_claimed"),
            "mu_step_measured": summary.get("mu_step_measured"),
            "mu_step_measured 95% CI": summary.get("mu_step_ci"),
        },
        "summary": summary,
        "valid": summary.get("valid"),
        "verdict": verdict(summary),
        "audits": records,
    }
    json_path = logdir.write_json(logdir.report_json, report)
    plots = _plots(records) if records else []
    grids = _image_grids(logdir, records) if records else {}
    html_path = write_private(logdir.report_html, _html(report, plots, grids).encode("utf-8"))
    return json_path, html_path


def build_comparison(out_dir: str | os.PathLike, run_dirs: list[str | os.PathLike]) -> Path:
    """One page across runs (e.g. one per noise multiplier): ε, success, bounds, quality, links.

    Each run dir must hold a ``report.json`` (see :func:`build_report`). Writes
    ``out_dir/comparison.html`` (owner-only) and returns its path.
    """
    plt = _pyplot()
    out_dir = private_mkdir(out_dir)
    runs = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        report = json.loads((run_dir / "report.json").read_text())
        runs.append((run_dir, report["summary"], report["verdict"]))
    rows, classes = [], []
    for _, s, v in runs:
        rates = s.get("mean_success_rate") or {}
        means = s.get("mean_metrics") or {}
        bounds = s.get("bounds") or {}
        rows.append(
            [
                fmt(s.get("noise_multiplier")),
                fmt(s.get("final_epsilon")),
                f"{s.get('found_singletons', 0)}/{s.get('true_singletons', 0)}",
                fmt(rates.get("raw"), ".2f"),
                fmt(rates.get("dm"), ".2f"),
                fmt(bounds.get("single_step"), ".3g"),
                fmt(means.get("lpips_raw"), ".3f"),
                fmt(means.get("lpips_dm"), ".3f"),
                v["headline"],
            ]
        )
        classes.append("fail" if v["status"] == "invalid" else "")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sig = [s.get("noise_multiplier") or 0 for _, s, _ in runs]
    for stage in ("raw", "dm"):
        ax.plot(
            sig,
            [(s.get("mean_success_rate") or {}).get(stage) for _, s, _ in runs],
            "o-",
            label=f"success {stage}",
        )
    ax.plot(
        sig,
        [(s.get("bounds") or {}).get("single_step") for _, s, _ in runs],
        "k--",
        label="ReRo bound, one step",
    )
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("noise multiplier σ")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    png = _png(fig)
    links = "".join(
        f"<li><a href='{html.escape(os.path.relpath(d / 'report.html', out_dir))}'>"
        f"σ = {html.escape(fmt(s.get('noise_multiplier')))}</a></li>"
        for d, s, _ in runs
    )
    page = "\n".join(
        [
            _head("opacus-dmaudit: runs compared"),
            f"<p class='notice'>⚠ {html.escape(PRIVATE_NOTICE)}</p>",
            "<h1>Runs compared</h1>",
            _table(
                rows,
                [
                    "σ",
                    "final ε",
                    "found/lone images",
                    "success raw",
                    "success DM",
                    "bound, one step",
                    "LPIPS raw",
                    "LPIPS DM",
                    "verdict",
                ],
                classes,
            ),
            _figure("success against noise", png, "Mean success per audit against σ."),
            f"<h2>Reports</h2><ul>{links}</ul>",
            "</body></html>",
        ]
    )
    return write_private(out_dir / "comparison.html", page.encode("utf-8"))
