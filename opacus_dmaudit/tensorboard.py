"""TensorBoard sink: every audit as scalars and image grids beside the privacy accounting.

Tags (``step`` is the optimizer step of the audit):

* ``privacy/epsilon``, ``privacy/mu_step`` (µ = 1/σ); a value of ∞ (σ = 0) is written as text under
  the same tag, since a scalar chart cannot show it;
* ``quality/<stage>/<metric>`` (means over the recovered images) and ``quality/<stage>/success_rate``
  for the stages ``raw`` (privatised readout), ``dm`` (DM reconstruction) and ``clean`` (readout of
  the clean clipped sum);
* ``bounds/<name>``: the ReRo bounds of the run so far, next to ``quality/*/success_rate``;
* ``audit/reconstructions``: one column per recovered image, rows truth | raw | DM;
* a custom-scalars layout ``dmaudit`` with quality and ε on one chart, and the run's
  hyper-parameters once, at :meth:`TensorBoardSink.close`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["TensorBoardSink", "STAGES"]

STAGES = ("raw", "dm", "clean")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class TensorBoardSink:
    """Writes audits through a ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        writer: the user's own writer (the audit lands in the run they already log to); it is
            flushed but not closed by :meth:`close`.
        log_dir: where to create a writer when ``writer`` is ``None``.
        max_columns: most recovered images in one image grid.
    """

    def __init__(
        self, *, writer=None, log_dir: str | os.PathLike | None = None, max_columns: int = 16
    ) -> None:
        if writer is None:
            if log_dir is None:
                raise ValueError("give a SummaryWriter or a log_dir")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir))
            for path in Path(writer.get_logdir()).glob("events.out.tfevents.*"):
                os.chmod(path, 0o600)  # the images in it are private training data
            self._owned = True
        else:
            self._owned = False
        self.writer = writer
        self.max_columns = max_columns
        self._layout_written = False
        self._last: dict[str, float] = {}

    def _layout(self, metrics: list[str]) -> None:
        charts = {}
        for metric in metrics:
            charts[f"{metric} and ε"] = [
                "Multiline",
                [f"quality/{s}/{metric}" for s in STAGES] + ["privacy/epsilon"],
            ]
        charts["success rate, bounds and ε"] = [
            "Multiline",
            [f"quality/{s}/success_rate" for s in STAGES] + ["bounds/.*", "privacy/epsilon"],
        ]
        self.writer.add_custom_scalars({"dmaudit": charts})
        self._layout_written = True

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if value is None:
            return
        if _finite(value):
            self.writer.add_scalar(tag, float(value), step)
            self._last[tag] = float(value)
        else:
            self.writer.add_text(tag, f"{tag} = {value} at step {step}", step)

    def log_audit(self, record: dict[str, Any], result=None) -> None:
        """Log one audit record (and its images, when ``result`` is an :class:`AuditResult`)."""
        step = int(record["step"])
        metrics = sorted(
            {
                k.rsplit("_", 1)[0]
                for k in record.get("summary", {})
                if k.rsplit("_", 1)[1] in STAGES
            }
        )
        if not self._layout_written:
            self._layout(metrics)
        self._scalar("privacy/epsilon", record.get("epsilon"), step)
        self._scalar("privacy/mu_step", record.get("mu_step"), step)
        for key, value in (record.get("summary") or {}).items():
            name, stage = key.rsplit("_", 1)
            if stage in STAGES:
                self._scalar(f"quality/{stage}/{name}", value, step)
        for stage, value in (record.get("success") or {}).items():
            self._scalar(f"quality/{stage}/success_rate", value, step)
        for name, value in (record.get("bounds") or {}).items():
            self._scalar(f"bounds/{name}", value, step)
        if result is not None and result.truth.shape[0] > 0:
            self.writer.add_image("audit/reconstructions", self.grid(result), step)
        self.writer.flush()

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
        metrics = {k: v for k, v in self._last.items()}
        if not metrics:
            return
        exp, ssi, sei = hparams_summary(clean, metrics)
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        self.writer.flush()

    def close(self, hparams: dict[str, Any] | None = None) -> None:
        """Write the hyper-parameters (once) and flush; closes the writer only if we made it."""
        if hparams:
            self.log_hparams(hparams)
        self.writer.flush()
        if self._owned:
            self.writer.close()
