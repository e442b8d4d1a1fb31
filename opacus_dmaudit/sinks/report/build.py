"""``dmaudit report``: ``report.json`` and ``report.html`` from whatever a log directory holds.

Works on a finished run or one that crashed: a torn last line of ``audit.jsonl`` is skipped, a
record that cannot be read is left out and named, an unreadable image file is left out and said
so. Inputs, all under the log dir (:mod:`..logdir`): ``audit.jsonl``, ``run.json`` and
``images/step_*.npz`` (loaded without pickle). The conclusions come from :mod:`..summary`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from ...privacy.measured import measured_rows
from ..audit_log import read_audit_log
from ..logdir import LogDir, load_images, package_versions, write_private
from ..summary import RunSummary, summarize
from .html import ReportPage, report_html
from .images import image_grids
from .page import PRIVATE_NOTICE
from .plots import plots

__all__ = ["build_report", "load_audit_images", "PRIVATE_NOTICE"]

logger = logging.getLogger(__name__)

#: Release 0.1's name of :func:`~opacus_dmaudit.sinks.logdir.load_images`.
load_audit_images = load_images


def _read_run(logdir: LogDir) -> dict[str, Any]:
    path = logdir.run_file
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        logger.warning(
            "%s is not valid JSON (%s); the report leaves the configuration out", path, err
        )
        return {}
    if not isinstance(run, dict):
        logger.warning("%s is not a JSON object; the report leaves the configuration out", path)
        return {}
    return run


def _check_folder(logdir: LogDir) -> None:
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


def privacy_table(summary: RunSummary) -> dict[str, Any]:
    """The run's privacy numbers, as ``report.json``'s ``privacy`` and the report's run table."""
    measured = summary.measured
    return {
        "noise_multiplier": summary.noise_multiplier,
        "mu_step": summary.mu_step,
        "sample_rate": summary.sample_rate,
        "delta": summary.delta,
        "steps_audited_through": summary.last_step,
        "final_epsilon": summary.epsilon,
        "epsilon_accountant": summary.epsilon_accountant,
        # the empirical estimates are of ONE step given the sample's inclusion (privacy.empirical)
        "epsilon_lower (measured, one step, 95%)": measured.get("epsilon_lower"),
        "epsilon of one step at mu_step (claimed)": measured.get("epsilon_step_claimed"),
        "mu_step_measured": measured.get("mu_step_measured"),
        "mu_step_measured 95% CI": measured.get("mu_step_ci"),
    }


def build_report(log_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` (owner-only) into ``log_dir``; returns both paths.

    Raises:
        FileNotFoundError: ``log_dir`` holds no ``audit.jsonl``.
        AuditLogError: the log is not an audit log (the message names the line).
        PermissionError: the folder cannot be read or written.
    """
    logdir = LogDir(log_dir)
    _check_folder(logdir)
    problems: list[str] = []
    records = read_audit_log(logdir.audit_log, problems=problems)
    for problem in problems:
        logger.warning("%s: left out of the report: %s", logdir.audit_log, problem)
    run = _read_run(logdir)
    summary = summarize(records)
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    versions = run.get("versions") if isinstance(run.get("versions"), dict) else package_versions()
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    report = {
        "generated": generated,
        "notice": PRIVATE_NOTICE,
        "config": config,
        "versions": versions,
        # the run's ε measured beside the accountant's (opacus_dmaudit.privacy.measured)
        "privacy": {**privacy_table(summary), **measured_rows(records)},
        "summary": summary.to_json(),
        "valid": summary.valid,
        "verdict": summary.verdict.to_json(),
        "audits": [r.to_json() for r in records],
        "unread_records": problems,
    }
    json_path = logdir.write_json(logdir.report_json, report)
    page = ReportPage(
        summary=summary,
        records=records,
        privacy=report["privacy"],
        config=config,
        versions=versions,
        generated=generated,
        plots=plots(records) if records else [],
        grids=image_grids(logdir, records),
        problems=problems,
    )
    html_path = write_private(logdir.report_html, report_html(page).encode("utf-8"))
    return json_path, html_path
