"""TensorBoard sink: every audit as scalars and image grids beside the privacy accounting.

The tags come from :func:`~opacus_dmaudit.schema.record_scalars` (``step`` is the optimizer step):

* ``privacy/epsilon``, ``privacy/epsilon_measured`` (with ``_low``/``_high``, its 95 % interval),
  ``privacy/mu_step`` (µ = 1/σ) and the membership test's ``privacy/*`` estimates; a
  value of ∞ (σ = 0) is written as text under the same tag, since a chart cannot show it;
  ``privacy/epsilon_note`` (text) says when ε carries no meaningful guarantee (ε > 100, or an
  RDP ε at the smallest order);
* ``quality/<stage>/<metric>`` (means over the recovered images), ``quality/<stage>/success_rate``
  for the stages ``raw``, ``dm`` and ``clean`` (see :data:`~opacus_dmaudit.schema.STAGES`);
* ``bounds/*``: ReRo bounds of the audited step itself (the event ``success_rate`` measures);
  ``run_bounds/*``: bounds of the whole run so far (another event: any step, composed);
* ``checks/<name>/status`` (0 pass, 1 warn, 2 fail) and ``checks/<name>/value``;
* ``audit/reconstructions``: one column per recovered image, rows truth | raw | DM, and its
  caption as text under the same tag (which bin each column is, its score, unfaithful DM);
* ``verdict`` (text, each audit): the verdict of the run so far in one sentence and the checks
  that failed so far (:func:`~.summary.summarize` over the audits this sink has logged);
* ``privacy/membership_roc`` (an image of the curve, each audit, in the auditor's own event file
  beside the grids) when the record carries the
  membership test's ROC points (``privacy_measured["roc_points"]``; issue 20 adds them);
* shadow audits (a simulated adversary) write their ``quality/*``, ``detection/*`` and image tags
  under ``shadow/`` instead;
* a custom-scalars layout grouping the charts under ``privacy``, ``quality`` and ``checks``, and
  the run's hyper-parameters at :meth:`close`.

Event files hold reconstructed training images, so images go only to an event file the auditor
creates itself, owner-only from the moment it exists (:func:`private_writer`; its name ends in
``.dmaudit``). Without ``writer=`` that writer takes everything. With ``writer=`` (yours,
Lightning's, Hugging Face's) the scalars and texts go to your run, whose event file your writer
created at the process umask and may be readable by others; the image grids then go to a private
event file in the auditor's ``log_dir`` (one warning says so when your file or folder is open to
other users). The auditor never changes the mode of your files.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._opacus import file_writer
from ..checks.entries import is_finite_number, status_rank
from ..record import AuditRecord
from ..schema import METRICS, STAGES, parse_metric_key
from .files import owner_only_umask, secure_file
from .text import fmt

__all__ = ["TensorBoardSink", "record_scalars", "private_writer"]

logger = logging.getLogger(__name__)

#: the suffix of the event files the auditor's own ``SummaryWriter`` creates
EVENTS_SUFFIX = ".dmaudit"


def private_writer(
    log_dir: str | os.PathLike,
    *,
    purge_step: int | None = None,
    own: Callable[[Path], None] | None = None,
):
    """A ``SummaryWriter`` whose event file is owner-only (0600) from the moment it exists.

    ``SummaryWriter`` creates its file itself at the process umask; the umask is set to 077 for
    the moment of its construction only (the file is created there). ``own`` receives the file's
    path (the auditor lists its own files).
    """
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(log_dir)
    before = set(folder.glob(f"*{EVENTS_SUFFIX}"))
    with owner_only_umask():
        writer = SummaryWriter(
            log_dir=str(folder), purge_step=purge_step, filename_suffix=EVENTS_SUFFIX
        )
    for path in sorted(set(folder.glob(f"*{EVENTS_SUFFIX}")) - before):
        secure_file(path)  # already 0600: a writer of another make might not honour the umask
        if own is not None:
            own(path)
    return writer


def _open_to_others(writer) -> Path | None:
    """The folder of a user's writer when it, or an event file in it, is open to other users."""
    try:
        folder = Path(file_writer(writer).get_logdir())
        paths = [folder, *folder.glob("events.out.tfevents.*")]
        if any(stat.S_IMODE(p.stat().st_mode) & 0o077 for p in paths):
            return folder
    except Exception:  # a writer of another make: say nothing about it
        return None
    return None


class TensorBoardSink:
    """Writes audits through a ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        writer: the user's own writer (the audit's scalars land in the run they already log
            to); it is flushed but not closed by :meth:`close`, and gets no images.
        log_dir: the auditor's folder: its private writer goes there (all events without
            ``writer``, the image grids with it).
        purge_step: a resumed run: events at this step and later, written before the resume,
            are hidden (TensorBoard's restart marker), so each audit shows once.
        max_columns: most recovered images in one image grid.
        own: called with each event file the sink creates (the auditor lists its own files).
        summarize: :func:`~.summary.summarize` (records -> run summary), for the ``verdict``
            text at each audit; without it no verdict text is written.
    """

    def __init__(
        self,
        *,
        writer=None,
        log_dir: str | os.PathLike | None = None,
        purge_step: int | None = None,
        max_columns: int = 16,
        own: Callable[[Path], None] | None = None,
        summarize: Callable[[list[AuditRecord]], Any] | None = None,
    ) -> None:
        self._summarize = summarize
        if log_dir is None:
            raise ValueError("give the auditor's log_dir (its private event file goes there)")
        self.log_dir = Path(log_dir)
        self._purge_step = purge_step
        self._own = own
        self._image_writer = None  # the auditor's private writer, for images
        if writer is None:
            writer = private_writer(log_dir, purge_step=purge_step, own=own)
            self._owned = True
            self._image_writer = writer
        else:
            self._owned = False
            if purge_step is not None:
                self._mark_restart(writer, purge_step)
            self._tell_about(writer)
        self.writer = writer
        self.max_columns = max_columns
        self._layout_written = False
        self._last: dict[str, float] = {}
        self._last_note: str | None = None
        self._records: list[AuditRecord] = []  # for the verdict of the run so far

    def _tell_about(self, writer) -> None:
        """Say once where the audit's images go when the user's run is open to others."""
        folder = _open_to_others(writer)
        log = logger.warning if folder is not None else logger.info
        log(
            "TensorBoard: the audit's scalars go to your SummaryWriter%s; its image grids "
            "(private training images) go to an owner-only event file of the auditor in %s",
            f" in {folder}, whose files other users can read" if folder is not None else "",
            self.log_dir,
        )

    @staticmethod
    def _mark_restart(writer, step: int) -> None:
        """What ``SummaryWriter(purge_step=step)`` writes: a restart marker at ``step``."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        fw = file_writer(writer)
        fw.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))

    def images_writer(self):
        """The auditor's own private writer (made at the first image when ``writer=`` is given).

        Raises:
            FileNotFoundError: the log dir was removed during the run (it is not made again).
        """
        self._folder_present()
        if self._image_writer is None:
            self._image_writer = private_writer(
                self.log_dir, purge_step=self._purge_step, own=self._own
            )
        return self._image_writer

    def _layout(self) -> None:
        """The custom-scalars layout: privacy, quality and checks, each a category."""
        quality = {}
        for metric, spec in METRICS.items():
            quality[spec.label] = ["Multiline", [f"quality/{s}/{metric}" for s in STAGES]]
        quality["success rate and this step's bounds"] = [
            "Multiline",
            [f"quality/{s}/success_rate" for s in STAGES] + ["bounds/single_step$"],
        ]
        quality["identification and its bound"] = [
            "Multiline",
            [f"quality/{s}/identification_rate" for s in STAGES]
            + ["bounds/single_step_identification"],
        ]
        privacy = {
            "ε and the measured estimates": ["Multiline", ["privacy/epsilon.*"]],
            "µ per step, claimed and measured": ["Multiline", ["privacy/mu_step.*"]],
            "this step's bounds": ["Multiline", ["bounds/.*"]],
            "whole-run bounds": ["Multiline", ["run_bounds/.*"]],
        }
        checks = {
            "status (0 pass, 1 warn, 2 fail)": ["Multiline", ["checks/.*/status"]],
            "values": ["Multiline", ["checks/.*/value"]],
            "detection": ["Multiline", ["detection/.*"]],
        }
        self.writer.add_custom_scalars(
            {"dmaudit: privacy": privacy, "dmaudit: quality": quality, "dmaudit: checks": checks}
        )
        self._layout_written = True

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if value is None:
            return
        if is_finite_number(value):
            self.writer.add_scalar(tag, float(value), step)
            self._last[tag] = float(value)
        else:
            self.writer.add_text(tag, f"{tag} = {value} at step {step}", step)

    def _folder_present(self) -> None:
        """Raise when the auditor's folder is gone: events handed to its private writer then fail
        in the writer's own thread, which prints a traceback instead of telling the sink guard,
        and a new private writer would create the removed folder again."""
        if not self.log_dir.is_dir():
            what = (
                "its TensorBoard events are"
                if self._owned
                else "the audit's image grids are (its scalars still go to your SummaryWriter)"
            )
            raise FileNotFoundError(
                f"the log dir {self.log_dir} was removed during the run; {what} not written "
                "from here on (the audits stay in auditor.history)"
            )

    def log_audit(self, record: AuditRecord, result=None) -> None:
        """Log one audit record (and its images, when ``result`` is an :class:`AuditResult`)."""
        if self._owned:  # the auditor's own writer takes everything: nothing more is written
            self._folder_present()
        step = record.step
        if not self._layout_written:
            self._layout()
        for tag, value in record_scalars(record).items():
            self._scalar(tag, value, step)
        note = record.epsilon_note
        if note and note != self._last_note:  # written when it first appears or changes
            self.writer.add_text("privacy/epsilon_note", note, step)
        self._last_note = note
        if record.failed_checks:
            text = "\n".join(f"* **{c.name}**: {c.detail}" for c in record.failed_checks)
            self.writer.add_text("checks/failed", text, step)
        self._verdict(record)
        self._roc(record)
        if result is not None and result.truth.dim() == 4 and result.truth.shape[0] > 0:
            shadow = record.mode == "shadow"
            tag = "shadow/reconstructions" if shadow else "audit/reconstructions"
            images = self.images_writer()
            images.add_image(tag, self.grid(result), step)
            images.add_text(tag, grid_caption(record, result, self.max_columns), step)
            if images is not self.writer:
                images.flush()
        self.writer.flush()

    def _verdict(self, record: AuditRecord) -> None:
        """The verdict of the run so far and the checks failed so far, as text."""
        if self._summarize is None:
            return
        self._records.append(record)
        summary = self._summarize(self._records)
        verdict = summary.verdict
        lines = [f"**{verdict.headline}**" if verdict is not None else "**No verdict yet.**"]
        failed = summary.failed_checks
        lines.append(
            "Failed checks so far: " + ", ".join(failed) + " (the audit is invalid)."
            if failed
            else "No check has failed so far."
        )
        self.writer.add_text("verdict", "\n\n".join(lines), record.step)

    def _roc(self, record: AuditRecord) -> None:
        """Hook: the membership test's ROC as a curve, once records carry its points.

        Reads ``privacy_measured["roc_points"]`` (``[[fpr, tpr], ...]`` or
        ``{"fpr": [...], "tpr": [...]}``); records without it write nothing.
        """
        points = roc_points(record)
        if points is None:
            return
        # beside the image grids: a user's run gets scalars and text only, never an image
        writer = self.images_writer()
        sigma = record.noise_multiplier
        mus = {"µ = 1/σ": 1.0 / sigma if sigma else None}
        mus["measured µ"] = (record.privacy_measured or {}).get("mu_step_measured")
        image = roc_image(points, record.step, mus=mus)
        writer.add_image("privacy/membership_roc", image, record.step)
        writer.add_text(
            "privacy/membership_roc",
            f"Membership test ROC at step {record.step} ({len(points[0])} points; the diagonal is "
            "chance, the claimed ε bounds how far above it any test can be).",
            record.step,
        )

    def grid(self, result) -> torch.Tensor:
        """``(C, H, W)`` grid: one column per recovered image, rows truth | raw | DM."""
        from torchvision.utils import make_grid

        n = min(result.truth.shape[0], self.max_columns)
        rows = [result.truth[:n], result.raw[:n]]
        if result.dm is not None:
            rows.append(result.dm[:n])
        images = torch.cat([r.float().clamp(0, 1) for r in rows])
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return make_grid(images, nrow=n, padding=2, pad_value=0.5)

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        """The run's hyper-parameters with the last value of every scalar, in this run's folder."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {
            k: (v if isinstance(v, int | float | str | bool) else str(v))
            for k, v in hparams.items()
        }
        metrics = dict(self._last)
        if not metrics:
            return
        exp, ssi, sei = hparams_summary(clean, metrics)
        fw = file_writer(self.writer)
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        self.writer.flush()

    def flush(self) -> None:
        if self._owned:
            self._folder_present()
        self.writer.flush()
        if self._image_writer is not None and self._image_writer is not self.writer:
            self._folder_present()
            self._image_writer.flush()

    def close(self, hparams: dict[str, Any] | None = None) -> None:
        """Write the hyper-parameters (once) and flush; closes only the writers the sink made."""
        try:
            if self._owned:
                self._folder_present()
            if hparams:
                self.log_hparams(hparams)
            self.writer.flush()
        finally:
            if self._image_writer is not None:
                self._image_writer.close()
            if self._owned:
                self.writer.close()


def grid_caption(record: AuditRecord, result, max_columns: int) -> str:
    """The caption of an audit's image grid: rows, then one line per column."""
    rows = "truth | raw readout | DM" if result.dm is not None else "truth | raw readout"
    crit = record.success_criterion
    metric = crit.metric if crit is not None else None
    lines = [f"Step {record.step}: rows {rows}; columns, left to right:"]
    for n, im in enumerate(record.scored[:max_columns], 1):
        parts = [f"{n}. bin {im.bin}"]
        for stage in ("raw", "dm"):
            value = im.metric(metric, stage) if metric else None
            if value is not None:
                parts.append(f"{stage} {METRICS[metric].label} {fmt(value, '.3f')}")
        if im.dm_faithful is False:
            parts.append("DM: prior unfaithful")
        lines.append("* " + ", ".join(parts))
    return "\n".join(lines)


def roc_points(record: AuditRecord) -> tuple[list[float], list[float]] | None:
    """``(fpr, tpr)`` of the membership test's ROC from a record, or ``None``."""
    raw = (record.privacy_measured or {}).get("roc_points")
    try:
        if isinstance(raw, dict):
            fpr, tpr = [float(x) for x in raw["fpr"]], [float(x) for x in raw["tpr"]]
        elif isinstance(raw, list | tuple):
            fpr, tpr = [float(p[0]) for p in raw], [float(p[1]) for p in raw]
        else:
            return None
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return (fpr, tpr) if fpr and len(fpr) == len(tpr) else None


def roc_image(
    points: tuple[list[float], list[float]], step: int, *, mus: dict | None = None
) -> torch.Tensor:
    """The ROC curve drawn as a ``(3, H, W)`` uint8 image, beside the Gaussian trade-off curve
    at each finite µ of ``mus`` (``{label: µ}``)."""
    import numpy as np

    from ..privacy.tradeoff import gaussian_tradeoff
    from .report.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=80)
    grid = np.linspace(0.0, 1.0, 101)
    for (label, mu), style in zip((mus or {}).items(), ("k-", "k--")):
        if isinstance(mu, int | float) and np.isfinite(mu):
            ax.plot(grid, gaussian_tradeoff(mu, grid), style, lw=1, label=f"{label} = {mu:.3g}")
    ax.plot(points[0], points[1], "o-", ms=3, label="membership test")
    ax.plot([0, 1], [0, 1], "k:", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"step {step}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return torch.from_numpy(rgb).permute(2, 0, 1)


def record_scalars(record: AuditRecord) -> dict[str, float]:
    """Every chart value of a record as ``{tag: value}`` (TensorBoard tags; ``inf`` kept as is).

    The one place that maps record fields to chart names: ``privacy/*``, ``quality/<stage>/*``,
    ``bounds/*`` (this step's bounds), ``run_bounds/*`` (whole run), ``detection/*``,
    ``checks/<name>/*``. A shadow audit's ``quality/*`` and ``detection/*`` tags are prefixed
    ``shadow/``: they describe the simulated adversary, not the trained model.
    """
    out: dict[str, Any] = {"privacy/epsilon": record.epsilon, "privacy/mu_step": record.mu_step}
    # the run's ε measured from what it did (noise, sampling, steps), beside the accountant's
    out["privacy/epsilon_measured"] = record.epsilon_measured
    low, high = record.epsilon_measured_ci or (None, None)
    out["privacy/epsilon_measured_low"], out["privacy/epsilon_measured_high"] = low, high
    for name, value in (record.privacy_measured or {}).items():
        out[f"privacy/{name}"] = value
    for key, value in record.means.items():
        metric, stage = parse_metric_key(key) or (None, None)
        if metric is not None:
            out[f"quality/{stage}/{metric}"] = value
    groups = (
        ("quality/{}/success_rate", record.success),
        ("quality/{}/identification_rate", record.identification or {}),
        ("quality/dm/fit_{}", record.prior_fit or {}),  # beside the DM metrics
        ("bounds/{}", record.bounds or {}),
        ("run_bounds/{}", record.run_bounds or {}),
    )
    for pattern, values in groups:
        out.update({pattern.format(name): value for name, value in values.items()})
    out["detection/power"] = record.detection_power
    if record.counts is not None:
        out["detection/found_singletons"] = record.counts.lone_found
        out["detection/true_singletons"] = record.counts.lone_in_batch
    for entry in record.checks:
        out[f"checks/{entry.name}/status"] = status_rank(entry.status)
        out[f"checks/{entry.name}/value"] = entry.value
    if record.mode == "shadow":  # a simulated adversary's numbers: never beside live ones
        out = {
            (f"shadow/{tag}" if tag.startswith(("quality/", "detection/")) else tag): value
            for tag, value in out.items()
        }
    return {tag: value for tag, value in out.items() if _chartable(tag, value)}


def _chartable(tag: str, value: Any) -> bool:
    """A number for a chart, never a bool or text; ``inf`` (written as text under the tag) only
    where it means something: ε, µ, metrics, bounds (not check values, fit or detection)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return False
    finite_only = tag.endswith("/value") or "/fit_" in tag or "detection/" in tag
    return math.isfinite(value) or not finite_only
