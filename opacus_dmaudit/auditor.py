"""The auditor: schedules audits on a live DP-SGD run and turns each capture into a logged record.

Data flow per audited step: capture (inside ``optimizer.step``) -> readout -> match to the real
batch -> metrics -> ``audit.jsonl``. Everything after the capture runs once the parameter update is
done, with the auditor's own generator; training is bit-identical with and without it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .audit_log import AuditLog
from .capture import CapturedStep, GradientCapture
from .imprint import ImprintBlock
from .metrics import HIGHER_IS_BETTER, LPIPS, image_metrics
from .prior import SAMPLERS, DiffusionPrior
from .privacy import epsilon_from_accountant, sample_rate_from_accountant, steps_from_accountant
from .readout import Readout, read_imprint

__all__ = ["DMAuditor", "AuditResult"]

logger = logging.getLogger(__name__)


class AuditResult:
    """Tensors of one audit, kept in memory for image sinks (the log holds only numbers).

    Attributes:
        record: the JSON record written to the log.
        truth: ``(M, C, H, W)`` matched real images (in [0, 1]).
        raw: ``(M, C, H, W)`` raw readouts, clipped to [0, 1].
        clean: ``(M, C, H, W)`` readouts of the clean clipped sum, clipped to [0, 1].
        dm: ``(M, C, H, W)`` DM reconstructions of the raw readouts (``None`` without a prior).
    """

    def __init__(self, record: dict[str, Any], truth, raw, clean, dm=None) -> None:
        self.record, self.truth, self.raw, self.clean, self.dm = record, truth, raw, clean, dm


class DMAuditor:
    """Audits an Opacus DP-SGD run every ``every_n_steps`` steps through an ``ImprintBlock``.

    Args:
        privacy_engine: the ``PrivacyEngine`` whose accountant gives ε (``None``: ε is not logged).
        log_dir: where ``audit.jsonl`` goes; created owner-only, since audit artifacts describe
            private training images.
        every_n_steps: audit every N-th optimizer step (steps are counted from 1).
        delta: δ for ε.
        metrics: any of ``"mse"``, ``"psnr"``, ``"ssim"``, ``"lpips"``.
        lpips_net: LPIPS backbone, ``"vgg"`` (the paper's choice) or ``"alex"``.
        occupancy_z: a bin counts as occupied when its bias-gradient sum exceeds this many noise
            stds (a statistical decision: under noise every bin "fires").
        max_images: score at most this many recovered images per audit (``None``: all).
        prior: a :class:`DiffusionPrior`, a name for :meth:`DiffusionPrior.from_pretrained`
            (e.g. ``"embedded:mnist"``), or ``None`` for no DM reconstruction.
        sampler: the prior's sampler, ``"ddim"``, ``"ddpm"`` or ``"posterior-mean"``.
        sampler_steps: DDIM steps from the matched timestep.
        seed: seed of the auditor's own generator (never the global RNG).
    """

    def __init__(
        self,
        *,
        privacy_engine=None,
        log_dir: str | os.PathLike,
        every_n_steps: int = 50,
        delta: float = 1e-5,
        metrics: Sequence[str] = ("mse", "psnr", "ssim", "lpips"),
        lpips_net: str = "vgg",
        occupancy_z: float = 4.0,
        max_images: int | None = None,
        prior: DiffusionPrior | str | os.PathLike | None = None,
        sampler: str = "ddim",
        sampler_steps: int = 20,
        seed: int = 0,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        unknown = set(metrics) - set(HIGHER_IS_BETTER)
        if unknown:
            raise ValueError(
                f"unknown metrics {sorted(unknown)}; choose from {sorted(HIGHER_IS_BETTER)}"
            )
        if occupancy_z <= 0:
            raise ValueError(f"occupancy_z must be positive, got {occupancy_z}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be positive or None, got {max_images}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not isinstance(sampler_steps, int) or sampler_steps < 1:
            raise ValueError(f"sampler_steps must be a positive integer, got {sampler_steps!r}")
        if prior is not None and not isinstance(prior, DiffusionPrior):
            prior = DiffusionPrior.from_pretrained(prior)
        self.prior: DiffusionPrior | None = prior
        self.sampler = sampler
        self.sampler_steps = sampler_steps
        self.privacy_engine = privacy_engine
        self.log_dir = Path(log_dir)
        self.every_n_steps = every_n_steps
        self.delta = float(delta)
        self.metrics = tuple(metrics)
        self.occupancy_z = float(occupancy_z)
        self.max_images = max_images
        self.generator = torch.Generator().manual_seed(seed)
        self.lpips = LPIPS(net=lpips_net) if "lpips" in self.metrics else None
        self.history: list[dict[str, Any]] = []
        self.last_result: AuditResult | None = None
        self._capture: GradientCapture | None = None
        self._log: AuditLog | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def accountant(self):
        return getattr(self.privacy_engine, "accountant", None)

    @property
    def block(self) -> ImprintBlock | None:
        return self._capture.block if self._capture is not None else None

    def attach(
        self,
        optimizer,
        *,
        block: ImprintBlock | None = None,
        example_input: torch.Tensor | None = None,
    ) -> DMAuditor:
        """Start auditing the run that ``optimizer`` (a ``DPOptimizer``) drives.

        Args:
            optimizer: the optimizer returned by ``PrivacyEngine.make_private``.
            block: the ``ImprintBlock`` to read (found through the optimizer if ``None``).
            example_input: a batch of training inputs; checked against the block's image shape.

        Returns:
            ``self``.
        """
        if self._capture is not None:
            raise RuntimeError("the auditor is already attached; call detach() first")
        capture = GradientCapture(
            optimizer,
            block=block,
            should_capture=self._is_audit_step,
            on_capture=self._process,
            start_step=steps_from_accountant(self.accountant),
        )
        if example_input is not None:
            capture.block._check_input(torch.as_tensor(example_input))
        if self.prior is not None:
            self.prior.check_fits(capture.block.image_shape)
        if self._log is None or self._log.closed:
            self._log = AuditLog(self.log_dir / "audit.jsonl")
        capture.attach()
        self._capture = capture
        return self

    def detach(self) -> None:
        """Stop auditing and restore the optimizer's step hook."""
        if self._capture is not None:
            self._capture.detach()
            self._capture = None

    def close(self) -> None:
        """Detach and close the audit log."""
        self.detach()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> DMAuditor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def step(self) -> int:
        """Optimizer steps seen so far."""
        return self._capture.step if self._capture is not None else 0

    def _is_audit_step(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    # -- processing ------------------------------------------------------------------------------
    def _process(self, captured: CapturedStep) -> None:
        start = time.perf_counter()
        try:
            result = self.audit(captured)
        except Exception:  # the audit must never take training down
            logger.exception("audit of step %d failed; training continues", captured.step)
            return
        result.record["audit_seconds"] = time.perf_counter() - start
        self.history.append(result.record)
        self.last_result = result
        if self._log is not None and not self._log.closed:
            self._log.append(result.record)

    def audit(self, captured: CapturedStep) -> AuditResult:
        """Read, match and score one captured step (no side effects)."""
        block = self._capture.block if self._capture is not None else None
        if block is None:
            raise RuntimeError("attach the auditor before auditing")
        lo, hi = block.value_range
        common = dict(
            structure=block.structure, image_shape=block.image_shape, value_range=(lo, hi)
        )
        noised = read_imprint(
            captured.weight_noised,
            captured.bias_noised,
            noise_std=captured.noise_std,
            clip_norm=captured.max_grad_norm if captured.clipping == "flat" else None,
            occupancy_z=self.occupancy_z,
            **common,
        )
        clean = read_imprint(captured.weight_clean, captured.bias_clean, noise_std=0.0, **common)
        found = noised.occupied_only()
        if self.max_images is not None:
            found = found.select(torch.arange(min(len(found), self.max_images)))

        members = captured.membership  # (K, B)
        truth_idx = self._match(found, captured.inputs, members)
        scale = lambda x: (x - lo) / (hi - lo)  # noqa: E731
        has_truth = [i for i, t in enumerate(truth_idx) if t is not None]
        images: list[dict[str, Any]] = []
        for row in range(len(found)):
            b = int(found.bins[row])
            images.append(
                {
                    "bin": b,
                    "occupied": True,
                    "zscore": float(found.zscore[row]),
                    "collision": bool(found.collision[row]),
                    "noise_std": float(found.noise_std[row]) / (hi - lo),
                    "true_count": int((members[b] != 0).sum()),
                }
            )
        empty = torch.zeros((0, *block.image_shape))
        truth = raw = clean_img = empty
        dm = empty if self.prior is not None else None
        if has_truth:
            truth = scale(captured.inputs[[truth_idx[i] for i in has_truth]].float())
            raw_unclipped = scale(found.images[has_truth])
            raw = raw_unclipped.clamp(0, 1)
            clean_img = scale(clean.images[found.bins[has_truth]]).clamp(0, 1)
            residual = (raw_unclipped - truth).flatten(1).std(dim=1)
            stages = [("raw", raw_unclipped), ("clean", clean_img)]
            if self.prior is not None:
                std = found.noise_std[has_truth].double() / (hi - lo)
                dm = self.prior.denoise(
                    raw_unclipped,
                    noise_std=torch.nan_to_num(std, posinf=1e6),
                    sampler=self.sampler,
                    steps=self.sampler_steps,
                    generator=self.generator,
                )
                stages.append(("dm", dm))
            scores = {
                stage: image_metrics(img, truth, names=self.metrics, lpips=self.lpips)
                for stage, img in stages
            }
            for j, row in enumerate(has_truth):
                images[row]["residual_std_raw"] = float(residual[j])
                for stage, values in scores.items():
                    for name, vals in values.items():
                        images[row][f"{name}_{stage}"] = float(vals[j])

        record = self._record(captured, noised, images, members)
        return AuditResult(record, truth, raw, clean_img, dm)

    @staticmethod
    def _match(found: Readout, inputs: torch.Tensor, members: torch.Tensor) -> list[int | None]:
        """Index into ``inputs`` of the real image behind each readout (nearest member on blends)."""
        out: list[int | None] = []
        for row in range(len(found)):
            idx = (members[int(found.bins[row])] != 0).nonzero().flatten()
            if idx.numel() == 0:
                out.append(None)
            elif idx.numel() == 1:
                out.append(int(idx[0]))
            else:
                cand = inputs[idx].flatten(1).double()
                err = ((cand - found.images[row].flatten().double()) ** 2).mean(dim=1)
                out.append(int(idx[err.argmin()]))
        return out

    def _record(
        self,
        captured: CapturedStep,
        noised: Readout,
        images: list[dict[str, Any]],
        members: torch.Tensor,
    ) -> dict[str, Any]:
        sigma = captured.noise_multiplier
        singles = (members != 0).sum(dim=1) == 1
        if members.numel():
            singles &= members.max(dim=1).values == 1
        summary: dict[str, Any] = {}
        for key in sorted({k for im in images for k in im if k.rsplit("_", 1)[0] in self.metrics}):
            vals = [im[key] for im in images if key in im and math.isfinite(im[key])]
            summary[key] = sum(vals) / len(vals) if vals else None
        return {
            "step": captured.step,
            "epsilon": epsilon_from_accountant(
                self.accountant, delta=self.delta, noise_multiplier=sigma
            ),
            "delta": self.delta,
            "noise_multiplier": sigma,
            "mu_step": (1.0 / sigma) if sigma > 0 else math.inf,
            "max_grad_norm": captured.max_grad_norm,
            "sample_rate": sample_rate_from_accountant(self.accountant),
            "clipping": captured.clipping,
            "batch_size": int(captured.inputs.shape[0]),
            "num_bins": int(noised.bins.numel()),
            "occupied_bins": int(noised.occupied.sum()),
            "true_singletons": int(singles.sum()),
            "found_singletons": int((singles & noised.occupied).sum()),
            "collisions_flagged": int((noised.collision & noised.occupied).sum()),
            "summary": summary,
            "denoiser": None
            if self.prior is None
            else {
                "prior": self.prior.source,
                "sampler": self.sampler,
                "steps": self.sampler_steps if self.sampler == "ddim" else None,
            },
            "images": images,
        }
