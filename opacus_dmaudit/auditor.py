"""The auditor: schedules audits on a live DP-SGD run and turns each capture into a logged record.

Data flow per audited step: capture (inside ``optimizer.step``) -> readout -> match to the real
batch -> metrics -> ``audit.jsonl``. Everything after the capture runs once the parameter update is
done, with the auditor's own generator; training is bit-identical with and without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .audit_log import AuditLog, make_private_dir, read_audit_log
from .bounds import run_bounds
from .capture import CapturedStep, GradientCapture
from .imprint import ImprintBlock
from .metrics import HIGHER_IS_BETTER, LPIPS, stage_metrics
from .prior import SAMPLERS, DiffusionPrior
from .privacy import epsilon_at_audit, sample_rate_from_accountant, steps_from_accountant
from .readout import Readout, read_imprint
from .report import build_report, package_versions, save_audit_images

__all__ = ["DMAuditor", "AuditResult", "DEFAULT_SUCCESS_THRESHOLDS"]

#: A reconstruction "succeeds" at LPIPS <= 0.1 (SSIM >= 0.7, PSNR >= 20 dB, MSE <= 0.01) by default.
DEFAULT_SUCCESS_THRESHOLDS = {"lpips": 0.1, "ssim": 0.7, "psnr": 20.0, "mse": 0.01}

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
        sampler_steps: the most DDIM steps from the matched timestep ``t*``.
        sampler_min_stride: fewest timesteps one DDIM step spans, so an image takes
            ``min(sampler_steps, ceil((t* + 1) / sampler_min_stride))`` steps. The default 20 is
            the in-training trade-off: about half the model calls of
            :meth:`DiffusionPrior.denoise`'s default of 10 at noise std ≤ 0.3, for LPIPS at most
            about 0.003 worse (``benchmarks/prior_quality.py``).
        success_metric: the metric that decides whether a reconstruction succeeded (default:
            ``"lpips"`` if computed, else SSIM, PSNR or MSE).
        success_threshold: the threshold η of that metric (success: LPIPS ≤ η, SSIM ≥ η, ...);
            defaults in ``DEFAULT_SUCCESS_THRESHOLDS`` (LPIPS 0.1, SSIM 0.7, PSNR 20 dB, MSE 0.01).
        kappa: baseline success rate κ of the ReRo bounds; ``None`` is ``1/N`` for the ``N``
            training samples (identifying one of them without the gradient).
        tensorboard: write TensorBoard events into ``log_dir`` (ignored when ``writer`` is given).
        save_images: keep each audit's truth, raw and DM images (uint8 ``.npz``, owner-only)
            under ``log_dir/images`` for the report.
        report: write ``report.json`` and ``report.html`` into ``log_dir`` at :meth:`close`.
        writer: your own ``SummaryWriter``, so the audit lands in the run you already log to.
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
        sampler_min_stride: int = 20,
        success_metric: str | None = None,
        success_threshold: float | None = None,
        kappa: float | None = None,
        tensorboard: bool = True,
        writer=None,
        save_images: bool = True,
        report: bool = True,
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
        if not isinstance(sampler_min_stride, int) or sampler_min_stride < 1:
            raise ValueError(
                f"sampler_min_stride must be a positive integer, got {sampler_min_stride!r}"
            )
        if success_metric is None:  # LPIPS, the paper's perceptual criterion, when it is computed
            success_metric = next(m for m in ("lpips", "ssim", "psnr", "mse") if m in metrics)
        if success_threshold is None:
            success_threshold = DEFAULT_SUCCESS_THRESHOLDS[success_metric]
        if success_metric not in metrics:
            raise ValueError(
                f"success_metric {success_metric!r} must be one of the metrics {tuple(metrics)}"
            )
        if kappa is not None and not 0 < kappa < 1:
            raise ValueError(f"kappa must be in (0, 1) or None, got {kappa}")
        if prior is not None and not isinstance(prior, DiffusionPrior):
            prior = DiffusionPrior.from_pretrained(prior)
        self.prior: DiffusionPrior | None = prior
        self.sampler = sampler
        self.sampler_steps = sampler_steps
        self.sampler_min_stride = sampler_min_stride
        self.privacy_engine = privacy_engine
        self.log_dir = Path(log_dir)
        self.every_n_steps = every_n_steps
        self.delta = float(delta)
        self.metrics = tuple(metrics)
        self.occupancy_z = float(occupancy_z)
        self.max_images = max_images
        self.success_metric = success_metric
        self.success_threshold = float(success_threshold)
        self.kappa = kappa
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.save_images = save_images
        self.write_report = report
        self._resume: dict[str, Any] | None = None
        self._tb_enabled = tensorboard or writer is not None
        self._writer = writer
        self._tb = None
        self.lpips = LPIPS(net=lpips_net) if "lpips" in self.metrics else None
        self.history: list[dict[str, Any]] = []
        self.last_result: AuditResult | None = None
        self._capture: GradientCapture | None = None
        self._log: AuditLog | None = None
        self._defer = False
        self._queued: list[CapturedStep] = []

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
        defer: bool = False,
    ) -> DMAuditor:
        """Start auditing the run that ``optimizer`` (a ``DPOptimizer``) drives.

        Args:
            optimizer: the optimizer returned by ``PrivacyEngine.make_private``.
            block: the ``ImprintBlock`` to read (found through the optimizer if ``None``).
            example_input: a batch of training inputs; checked against the block's image shape.
            defer: capture inside ``optimizer.step`` as always, but score and log only when
                :meth:`flush` is called (the framework adapters call it from their own
                after-step callback) instead of right after the parameter update.

        Returns:
            ``self``.
        """
        if self._capture is not None:
            raise RuntimeError("the auditor is already attached; call detach() first")
        self._defer = defer
        capture = GradientCapture(
            optimizer,
            block=block,
            should_capture=self._is_audit_step,
            on_capture=self._process,
            start_step=self._resume["step"]
            if self._resume is not None
            else steps_from_accountant(self.accountant),
        )
        if example_input is not None:
            capture.block._check_input(torch.as_tensor(example_input))
        if self.prior is not None:
            self.prior.check_fits(capture.block.image_shape)
        if capture.distributed and capture.rank != 0:
            # DDP: this rank only feeds rank 0's capture (inputs, clean sums); no audit work
            capture.attach()
            self._capture = capture
            return self
        if self._log is None or self._log.closed:
            self._log = AuditLog(self.log_dir / "audit.jsonl")
        if self._resume is not None:
            # audits recorded after the checkpoint will be redone: drop them, keep the rest
            self._log.keep_through_step(self._resume["step"])
            self.history = [
                r for r in read_audit_log(self._log.path) if r["step"] <= self._resume["step"]
            ]
            self._resume = None
        self._write_run_file(capture)
        if self._tb_enabled and self._tb is None:
            from .tensorboard import TensorBoardSink

            self._tb = TensorBoardSink(writer=self._writer, log_dir=self.log_dir)
        capture.attach()
        self._capture = capture
        return self

    def flush(self) -> AuditResult | None:
        """Score and log the captures that ``attach(defer=True)`` queued; the last result."""
        result = None
        while self._queued:
            result = self._score_and_log(self._queued.pop(0)) or result
        return result

    def detach(self) -> None:
        """Stop auditing (scoring what is queued) and restore the optimizer's step hook."""
        self.flush()
        if self._capture is not None:
            self._capture.detach()
            self._capture = None

    def close(self) -> None:
        """Detach, write the hyper-parameters to TensorBoard and close the audit log."""
        self.detach()
        if self._tb is not None:
            try:
                self._tb.close(hparams=self.config())
            finally:
                self._tb = None
        if self._log is not None:
            self._log.close()
            if self.write_report and self._log.path.is_file():
                try:
                    build_report(self.log_dir)
                except Exception:
                    logger.exception("writing the report into %s failed", self.log_dir)

    # -- configuration and resume ----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The auditor's settings (for reports and TensorBoard's hyper-parameters)."""
        return {
            "every_n_steps": self.every_n_steps,
            "delta": self.delta,
            "metrics": ",".join(self.metrics),
            "occupancy_z": self.occupancy_z,
            "max_images": self.max_images,
            "prior": self.prior.source if self.prior is not None else None,
            "sampler": self.sampler if self.prior is not None else None,
            "sampler_steps": self.sampler_steps if self.prior is not None else None,
            "sampler_min_stride": self.sampler_min_stride if self.prior is not None else None,
            "success_metric": self.success_metric,
            "success_threshold": self.success_threshold,
            "kappa": self.kappa,
            "seed": self.seed,
        }

    def _write_run_file(self, capture: GradientCapture) -> None:
        block = capture.block
        run = {
            "config": {
                **self.config(),
                "prior_details": self.prior.describe() if self.prior is not None else None,
                "imprint_block": {
                    "image_shape": list(block.image_shape),
                    "num_bins": block.num_bins,
                    "structure": block.structure,
                    "value_range": list(block.value_range),
                },
                "noise_multiplier": capture.optimizer.noise_multiplier,
                "max_grad_norm": capture.optimizer.max_grad_norm,
                "accountant": type(self.accountant).__name__ if self.accountant else None,
            },
            "versions": package_versions(),
        }
        make_private_dir(self.log_dir)
        path = self.log_dir / "run.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(run, f, indent=1, default=str)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the audit exactly: step, RNG state, settings."""
        return {
            "version": 1,
            "step": self.step,
            "num_audits": len(self.history),
            "last_audit_step": self.history[-1]["step"] if self.history else None,
            "generator": self.generator.get_state().tolist(),  # JSON-safe
            "config": self.config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` before :meth:`attach`; the log continues from there.

        Audits that the log holds for steps after the checkpoint (the crashed run got further
        than its last checkpoint) are dropped from the log and redone, so no audit is duplicated
        or missing.
        """
        if self._capture is not None:
            raise RuntimeError("load_state_dict before attach()")
        if state.get("version") != 1:
            raise ValueError(f"unknown auditor state version {state.get('version')!r}")
        if state["config"].get("every_n_steps") != self.every_n_steps:
            logger.warning(
                "resuming with every_n_steps=%d (was %s)",
                self.every_n_steps,
                state["config"].get("every_n_steps"),
            )
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
        self._resume = {"step": int(state["step"])}

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
        if self._defer:
            self._queued.append(captured)
        else:
            self._score_and_log(captured)

    def _score_and_log(self, captured: CapturedStep) -> AuditResult | None:
        start = time.perf_counter()
        try:
            result = self.audit(captured)
        except Exception:  # the audit must never take training down
            logger.exception("audit of step %d failed; training continues", captured.step)
            return None
        result.record["audit_seconds"] = time.perf_counter() - start
        self.history.append(result.record)
        self.last_result = result
        if self._log is not None and not self._log.closed:
            self._log.append(result.record)
        if self.save_images and result.truth.shape[0] > 0:
            try:
                save_audit_images(
                    self.log_dir, captured.step, truth=result.truth, raw=result.raw, dm=result.dm
                )
            except Exception:
                logger.exception("saving the images of step %d failed", captured.step)
        if self._tb is not None:
            try:
                self._tb.log_audit(result.record, result)
            except Exception:
                logger.exception("TensorBoard logging of step %d failed", captured.step)
        return result

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
        # samples reconstructed to the criterion, per stage (none when no bin was found)
        success: dict[str, int] = dict.fromkeys(
            ("raw", "clean", "dm") if self.prior else ("raw", "clean"), 0
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
            stages = {"raw": raw_unclipped, "clean": clean_img}
            if self.prior is not None:
                std = found.noise_std[has_truth].double() / (hi - lo)
                dm = self.prior.denoise(
                    raw_unclipped,
                    noise_std=torch.nan_to_num(std, posinf=1e6),
                    sampler=self.sampler,
                    steps=self.sampler_steps,
                    min_stride=self.sampler_min_stride,
                    generator=self.generator,
                )
                stages["dm"] = dm
            scores = stage_metrics(stages, truth, names=self.metrics, lpips=self.lpips)
            for j, row in enumerate(has_truth):
                images[row]["residual_std_raw"] = float(residual[j])
                for stage, values in scores.items():
                    for name, vals in values.items():
                        images[row][f"{name}_{stage}"] = float(vals[j])
            for stage, values in scores.items():
                vals = values[self.success_metric]
                ok = (
                    vals >= self.success_threshold
                    if HIGHER_IS_BETTER[self.success_metric]
                    else vals <= self.success_threshold
                )
                hits = {truth_idx[row] for j, row in enumerate(has_truth) if bool(ok[j])}
                success[stage] = len(hits)

        record = self._record(captured, noised, images, members, success)
        return AuditResult(record, truth, raw, clean_img, dm)

    def _kappa(self, sample_rate: float | None) -> float | None:
        """κ as configured, else 1/N with N = expected batch size / sampling rate."""
        if self.kappa is not None:
            return self.kappa
        expected = (
            getattr(self._capture.optimizer, "expected_batch_size", None) if self._capture else None
        )
        if not sample_rate or not expected:
            return None
        n = round(expected / sample_rate)
        return 1.0 / n if n > 1 else None

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
        success: dict[str, int],
    ) -> dict[str, Any]:
        sigma = captured.noise_multiplier
        batch = int(captured.inputs.shape[0])
        sample_rate = sample_rate_from_accountant(self.accountant)
        kappa = self._kappa(sample_rate)
        bounds = None
        if sample_rate is not None and kappa is not None:
            bounds = run_bounds(
                noise_multiplier=sigma,
                sample_rate=sample_rate,
                steps=steps_from_accountant(self.accountant),
                kappa=kappa,
            )
        singles = (members != 0).sum(dim=1) == 1
        if members.numel():
            singles &= members.max(dim=1).values == 1
        summary: dict[str, Any] = {}
        for key in sorted({k for im in images for k in im if k.rsplit("_", 1)[0] in self.metrics}):
            vals = [im[key] for im in images if key in im and math.isfinite(im[key])]
            summary[key] = sum(vals) / len(vals) if vals else None
        epsilon, epsilon_method = epsilon_at_audit(
            self.accountant, delta=self.delta, noise_multiplier=sigma
        )
        return {
            "step": captured.step,
            "epsilon": epsilon,
            "epsilon_accountant": epsilon_method,
            "delta": self.delta,
            "noise_multiplier": sigma,
            "mu_step": (1.0 / sigma) if sigma > 0 else math.inf,
            "max_grad_norm": captured.max_grad_norm,
            "sample_rate": sample_rate,
            "clipping": captured.clipping,
            "batch_size": batch,
            "num_bins": int(noised.bins.numel()),
            "occupied_bins": int(noised.occupied.sum()),
            "true_singletons": int(singles.sum()),
            "found_singletons": int((singles & noised.occupied).sum()),
            "collisions_flagged": int((noised.collision & noised.occupied).sum()),
            "summary": summary,
            "success_criterion": {
                "metric": self.success_metric,
                "threshold": self.success_threshold,
                "higher_is_better": HIGHER_IS_BETTER[self.success_metric],
            },
            # fraction of the batch's samples reconstructed to the criterion, per stage
            "success": {stage: (n / batch if batch else None) for stage, n in success.items()},
            "kappa": kappa,
            "bounds": bounds,
            "denoiser": None
            if self.prior is None
            else {
                "prior": self.prior.source,
                "sampler": self.sampler,
                "steps": self.sampler_steps if self.sampler == "ddim" else None,
                "min_stride": self.sampler_min_stride if self.sampler == "ddim" else None,
            },
            "images": images,
        }
