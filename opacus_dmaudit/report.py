"""The audit report: ``report.json`` and one self-contained ``report.html`` from a log directory.

Works on whatever the log holds — a finished run, or one that crashed (a torn last line of
``audit.jsonl`` is skipped). Inputs, all under the log dir: ``audit.jsonl`` (one record per audit),
``run.json`` (configuration, written at attach) and ``images/step_*.npz`` (truth, raw readout and
DM reconstruction of each audit as uint8 arrays; loaded without pickle).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .audit_log import make_private_dir, read_audit_log

__all__ = [
    "build_report",
    "build_comparison",
    "package_versions",
    "save_audit_images",
    "load_audit_images",
]

PRIVATE_NOTICE = (
    "This report contains images of private training data (true training images and their "
    "reconstructions). Keep it where only people allowed to see the training data can read it."
)


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what the audit computed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("opacus-dmaudit", "opacus", "torch", "diffusers", "lpips", "scikit-image"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def save_audit_images(log_dir: str | os.PathLike, step: int, **images) -> Path:
    """Store an audit's images (``(N, C, H, W)`` in [0, 1]) as uint8 in ``images/step_N.npz``."""
    folder = make_private_dir(Path(log_dir) / "images")
    arrays = {}
    for name, img in images.items():
        if img is None:
            continue
        arr = np.asarray(img.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5)
        arrays[name] = arr.astype(np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = folder / f"step_{int(step):08d}.npz"
    _write_private(path, buf.getvalue())
    return path


def load_audit_images(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an audit's images back (no pickle: object arrays are refused)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# -- summary and verdict ------------------------------------------------------------------------
def _mean(values):
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Run-level numbers: final ε, mean metrics per stage, success rates beside the bounds."""
    if not records:
        return {"audits": 0}
    last = records[-1]
    keys = sorted({k for r in records for k in (r.get("summary") or {})})
    means = {k: _mean([(r.get("summary") or {}).get(k) for r in records]) for k in keys}
    stages = sorted({s for r in records for s in (r.get("success") or {})})
    success = {s: _mean([(r.get("success") or {}).get(s) for r in records]) for s in stages}
    return {
        "audits": len(records),
        "first_step": records[0]["step"],
        "last_step": last["step"],
        "final_epsilon": last.get("epsilon"),
        "delta": last.get("delta"),
        "noise_multiplier": last.get("noise_multiplier"),
        "mu_step": last.get("mu_step"),
        "sample_rate": last.get("sample_rate"),
        "kappa": last.get("kappa"),
        "success_criterion": last.get("success_criterion"),
        "mean_success_rate": success,
        "final_bounds": last.get("bounds"),
        "mean_metrics": means,
        "found_singletons": sum(r.get("found_singletons") or 0 for r in records),
        "true_singletons": sum(r.get("true_singletons") or 0 for r in records),
    }


def _fmt(value, spec=".3g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def verdict(summary: dict[str, Any]) -> str:
    """One paragraph that says what the audit found, in plain words."""
    if not summary.get("audits"):
        return "No audit was recorded, so nothing can be said about this run."
    crit = summary.get("success_criterion") or {}
    op = "≥" if crit.get("higher_is_better") else "≤"
    rule = f"{str(crit.get('metric', '?')).upper()} {op} {crit.get('threshold', '?')}"
    rates = summary.get("mean_success_rate") or {}
    raw, dm = rates.get("raw"), rates.get("dm")
    bound = (summary.get("final_bounds") or {}).get("single_step")
    eps = summary.get("final_epsilon")
    parts = [
        f"Over {summary['audits']} audits (steps {summary['first_step']}–{summary['last_step']}), "
        f"at noise multiplier σ = {_fmt(summary.get('noise_multiplier'))} "
        f"(ε = {_fmt(eps)} at δ = {_fmt(summary.get('delta'))}),"
    ]
    parts.append(
        f"the raw readouts reconstructed {_fmt(raw, '.1%') if raw is not None else 'n/a'} of each "
        f"audited batch to the criterion {rule}"
    )
    if dm is not None:
        parts.append(f"and the diffusion prior {_fmt(dm, '.1%')}.")
    else:
        parts[-1] += "."
    if bound is not None:
        parts.append(
            f"For one step of this mechanism, no attack can exceed a success rate of "
            f"{_fmt(bound, '.3g')} (ReRo bound at baseline κ = {_fmt(summary.get('kappa'))})."
        )
    best = max([r for r in (raw, dm) if r is not None], default=None)
    if best is not None and best > 0.05:
        parts.append(
            "Training images are visibly recoverable from single privatised gradients: the noise "
            "level does not hide individual images from an attacker who controls the model."
        )
    elif best is not None:
        parts.append(
            "No image was recovered to the criterion: at this noise level the audit shows no "
            "visible leakage (which is evidence, not proof: the bounds above are the guarantee)."
        )
    return " ".join(parts)


# -- plots and images ---------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    steps = [r["step"] for r in records]
    eps = [r.get("epsilon") for r in records]
    keys = sorted({k for r in records for k in (r.get("summary") or {})})
    metrics = sorted({k.rsplit("_", 1)[0] for k in keys})
    finite_eps = all(isinstance(e, int | float) and math.isfinite(e) for e in eps)
    for metric in metrics:
        fig, axes = plt.subplots(1, 2 if finite_eps else 1, figsize=(9 if finite_eps else 4.5, 3))
        axes = np.atleast_1d(axes)
        for key in [k for k in keys if k.rsplit("_", 1)[0] == metric]:
            ys = [(r.get("summary") or {}).get(key) for r in records]
            ys = [np.nan if y is None else y for y in ys]
            axes[0].plot(steps, ys, marker="o", label=key.rsplit("_", 1)[1])
            if finite_eps:
                axes[1].plot(eps, ys, marker="o", label=key.rsplit("_", 1)[1])
        axes[0].set_xlabel("step")
        axes[0].set_ylabel(metric.upper())
        axes[0].legend()
        if finite_eps:
            axes[1].set_xlabel("ε")
            axes[1].set_ylabel(metric.upper())
        out.append((f"{metric.upper()} against step and ε", _png(fig)))
    if any(r.get("success") for r in records):
        fig, axes = plt.subplots(1, 2 if finite_eps else 1, figsize=(9 if finite_eps else 4.5, 3))
        axes = np.atleast_1d(axes)
        for stage in sorted({s for r in records for s in (r.get("success") or {})}):
            ys = [(r.get("success") or {}).get(stage) for r in records]
            ys = [np.nan if y is None else y for y in ys]
            axes[0].plot(steps, ys, marker="o", label=f"{stage} success")
            if finite_eps:
                axes[1].plot(eps, ys, marker="o", label=f"{stage} success")
        for name in sorted({n for r in records for n in (r.get("bounds") or {})}):
            ys = [(r.get("bounds") or {}).get(name) for r in records]
            ys = [np.nan if y is None else y for y in ys]
            axes[0].plot(steps, ys, linestyle="--", label=f"bound: {name}")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("success rate")
        axes[0].set_ylim(-0.02, 1.02)
        axes[0].legend(fontsize=7)
        if finite_eps:
            axes[1].set_xlabel("ε")
            axes[1].set_ylim(-0.02, 1.02)
        out.append(("Reconstruction success rate and ReRo bounds", _png(fig)))
    return out


def _grid_png(columns: list[list[np.ndarray]], row_names: list[str]) -> str:
    """One PNG of images in a grid (a column per sample, a row per stage), drawn as one mosaic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, ax = plt.subplots(figsize=(1.1 * ncol + 0.8, 1.1 * nrow))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(nrow)], row_names, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return _png(fig)


def _best_worst(log_dir: Path, records, *, count: int = 8):
    """Best and worst scored reconstructions across audits, as image-grid PNGs."""
    stage = (
        "dm"
        if any("lpips_dm" in im or "mse_dm" in im for r in records for im in r["images"])
        else "raw"
    )
    metric = next(
        (
            m
            for m in ("lpips", "ssim", "mse")
            if any(f"{m}_{stage}" in im for r in records for im in r["images"])
        ),
        None,
    )
    if metric is None:
        return None
    higher = metric == "ssim"
    items = []
    for r in records:
        path = log_dir / "images" / f"step_{int(r['step']):08d}.npz"
        if not path.is_file():
            continue
        scored = [im for im in r["images"] if f"{metric}_raw" in im]
        for j, im in enumerate(scored):
            items.append((im.get(f"{metric}_{stage}"), path, j, r["step"]))
    items = [it for it in items if it[0] is not None]
    if not items:
        return None
    items.sort(key=lambda it: it[0], reverse=higher)
    cache: dict[Path, dict[str, np.ndarray]] = {}

    def columns(selection):
        cols = []
        for _, path, j, _ in selection:
            arrays = cache.setdefault(path, load_audit_images(path))
            cols.append([arrays[k][j] if k in arrays else None for k in ("truth", "raw", "dm")])
        return cols

    rows = ["truth", "raw readout", "DM"]
    best = items[:count]
    worst = items[-count:][::-1]
    return {
        "metric": f"{metric}_{stage}",
        "best": _grid_png(columns(best), rows),
        "worst": _grid_png(columns(worst), rows),
        "best_values": [(it[3], it[0]) for it in best],
        "worst_values": [(it[3], it[0]) for it in worst],
    }


EXPLANATION = """
<p>The auditor plays the strongest realistic attacker against DP-SGD: the model's first layer is an
<em>imprint layer</em> that routes each training image into the gradient of one row of a linear
layer. From the privatised (clipped and noised) gradient of a step, each singly-occupied row gives
the image back plus Gaussian noise whose size the noise multiplier σ sets. The <em>raw readout</em>
is that noisy image; the <em>DM reconstruction</em> denoises it with a diffusion model trained on
public images of the same kind; the <em>clean</em> stage reads the clipped gradient before noise
(what an attacker would get without DP).</p>
<p><strong>What it can show:</strong> whether training images are recognisable from one step's
privatised gradient, for this model, data and noise level; how this compares with the formal
reconstruction-robustness (ReRo) bounds.</p>
<p><strong>What it cannot show:</strong> that a run is private. A failed reconstruction is evidence,
not proof. And <strong>at high noise the DM output is a plausible sample of the prior, not evidence
of leakage</strong>: a crisp digit may be a digit the prior invented. Judge reconstructions by their
agreement with the truth (the metrics), never by how realistic they look.</p>
<p>The bounds: for a baseline κ (the success rate of guessing without the gradient; 1/N for
singling out one of N training images by default) no attack can succeed with probability above
the bound. <em>single_step</em> is the exact bound for one Gaussian step with µ = 1/σ (what this
audit's attack sees); <em>rdp</em> and <em>profile</em> cover the whole run so far (Rényi DP and the
PRV privacy profile); <em>clt_gdp</em> is the CLT µ-GDP approximation, which can be optimistic at
small σ and few steps.</p>
"""


def _head(title: str) -> str:
    """Start of a self-contained page: no external resource, inline style."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        ".notice{background:#fff3cd;border:2px solid #c90;padding:.8em;font-weight:bold}"
        "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #bbb;padding:2px 6px}"
        "img{max-width:100%}</style></head><body>"
    )


def _table(rows: list[list[str]], header: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _html(report: dict[str, Any], plots, grids) -> str:
    esc = html.escape
    s = report["summary"]
    audits_rows = []
    for r in report["audits"]:
        succ = r.get("success") or {}
        b = r.get("bounds") or {}
        audits_rows.append(
            [
                str(r["step"]),
                _fmt(r.get("epsilon")),
                f"{r.get('found_singletons')}/{r.get('true_singletons')}",
                _fmt(succ.get("raw"), ".2f"),
                _fmt(succ.get("dm"), ".2f"),
                _fmt(b.get("single_step"), ".3g"),
                _fmt(b.get("rdp"), ".3g"),
                _fmt(b.get("profile"), ".3g"),
            ]
        )
    parts = [
        _head("opacus-dmaudit report"),
        f"<p class='notice' id='private-notice'>⚠ {esc(PRIVATE_NOTICE)}</p>",
        "<h1>Visual privacy audit</h1>",
        f"<p id='verdict'>{esc(report['verdict'])}</p>",
        "<h2>Run</h2>",
        _table(
            [
                [esc_k, _fmt(v) if isinstance(v, float) else str(v)]
                for esc_k, v in report["privacy"].items()
            ],
            ["privacy parameter", "value"],
        ),
        "<h2>Audits</h2>",
        _table(
            audits_rows,
            [
                "step",
                "ε",
                "found/true singletons",
                "success raw",
                "success DM",
                "bound 1 step",
                "bound RDP",
                "bound profile",
            ],
        ),
    ]
    crit = s.get("success_criterion") or {}
    parts.append(
        f"<p>Success criterion: {esc(str(crit.get('metric')))} "
        f"{'≥' if crit.get('higher_is_better') else '≤'} {esc(str(crit.get('threshold')))}; "
        f"baseline κ = {esc(_fmt(s.get('kappa')))}.</p>"
    )
    for title, png in plots:
        parts.append(
            f"<h3>{esc(title)}</h3><img alt='{esc(title)}' src='data:image/png;base64,{png}'>"
        )
    if grids:
        parts.append(f"<h2>Best and worst reconstructions (by {esc(grids['metric'])})</h2>")
        parts.append(
            f"<img alt='best reconstructions' src='data:image/png;base64,{grids['best']}'>"
        )
        parts.append(
            f"<img alt='worst reconstructions' src='data:image/png;base64,{grids['worst']}'>"
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


def build_report(log_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` (owner-only) into ``log_dir``; returns both paths."""
    log_dir = Path(log_dir)
    log_path = log_dir / "audit.jsonl"
    if not log_path.is_file():
        raise FileNotFoundError(f"{log_dir} has no audit.jsonl: is it an auditor's log_dir?")
    records = read_audit_log(log_path)
    run_path = log_dir / "run.json"
    run = json.loads(run_path.read_text()) if run_path.is_file() else {}
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
        },
        "summary": summary,
        "verdict": verdict(summary),
        "audits": records,
    }
    make_private_dir(log_dir)
    json_path, html_path = log_dir / "report.json", log_dir / "report.html"
    _write_private(json_path, json.dumps(report, indent=1, allow_nan=True).encode())
    plots = _plots(records) if records else []
    grids = _best_worst(log_dir, records) if records else None
    _write_private(html_path, _html(report, plots, grids).encode("utf-8"))
    return json_path, html_path


def build_comparison(out_dir: str | os.PathLike, run_dirs: list[str | os.PathLike]) -> Path:
    """One page across runs (e.g. one per noise multiplier): ε, success, bounds, quality, links.

    Each run dir must hold a ``report.json`` (see :func:`build_report`). Writes
    ``out_dir/comparison.html`` (owner-only) and returns its path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = make_private_dir(out_dir)
    runs = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        report = json.loads((run_dir / "report.json").read_text())
        runs.append((run_dir, report["summary"]))
    rows = []
    for _, s in runs:
        rates = s.get("mean_success_rate") or {}
        means = s.get("mean_metrics") or {}
        bounds = s.get("final_bounds") or {}
        rows.append(
            [
                _fmt(s.get("noise_multiplier")),
                _fmt(s.get("final_epsilon")),
                f"{s.get('found_singletons', 0)}/{s.get('true_singletons', 0)}",
                _fmt(rates.get("raw"), ".2f"),
                _fmt(rates.get("dm"), ".2f"),
                _fmt(bounds.get("single_step"), ".3g"),
                _fmt(bounds.get("rdp"), ".3g"),
                _fmt(means.get("lpips_raw"), ".3f"),
                _fmt(means.get("lpips_dm"), ".3f"),
            ]
        )
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sig = [s.get("noise_multiplier") or 0 for _, s in runs]
    for stage in ("raw", "dm"):
        ax.plot(
            sig,
            [(s.get("mean_success_rate") or {}).get(stage) for _, s in runs],
            "o-",
            label=f"success {stage}",
        )
    ax.plot(
        sig,
        [(s.get("final_bounds") or {}).get("single_step") for _, s in runs],
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
        f"σ = {html.escape(_fmt(s.get('noise_multiplier')))}</a></li>"
        for d, s in runs
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
                    "found/true singletons",
                    "success raw",
                    "success DM",
                    "bound 1 step",
                    "bound RDP",
                    "LPIPS raw",
                    "LPIPS DM",
                ],
            ),
            f"<img alt='success against noise' src='data:image/png;base64,{png}'>",
            f"<h2>Reports</h2><ul>{links}</ul>",
            "</body></html>",
        ]
    )
    path = out_dir / "comparison.html"
    _write_private(path, page.encode("utf-8"))
    return path
