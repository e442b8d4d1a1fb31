"""One audit, start to finish: captured step -> checks -> scoring -> privacy numbers -> record.

:class:`AuditPipeline` is everything an audit computes, with no scheduling and no sinks: the
auditor (:mod:`.auditor`) decides *when* to audit and where the result goes, this module decides
*what* the result is. Stages, in order:

1. shadow (:mod:`.shadow`): without an ``ImprintBlock``, a simulated worst-case imprint adversary
   turns the real batch into an imprint capture;
2. scoring (:mod:`.scoring`): readout, match, prior, metrics, success;
3. checks (:mod:`.checks`, :mod:`.mechanism`, :mod:`.prior_fit`): the entries that gate the verdict;
4. privacy (:mod:`.privacy`, :mod:`.bounds`, :mod:`.baseline`, :mod:`.empirical`): ε in context,
   κ, the bounds of this step and of the whole run, the measured per-step µ;
5. the record (:mod:`.schema`), written by the sinks.

Its only side effects: the generator it is given advances (shadow noise, the prior's sampler) and
the step's membership scores join the run's pooled empirical estimate.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from typing import Any

import torch

from ._opacus import rdp_orders
from .capture.imprint import ImprintBlock
from .capture.step import CapturedStep
from .checks.mechanism import mechanism_checks
from .checks.prior_fit import PublicFit, audit_fit, public_fit, unknown_fit
from .checks.validity import validity_checks
from .config import AuditConfig
from .privacy.accountant import (
    accountant_kind,
    history_from_accountant,
    read_epsilon,
    sample_rate_from_accountant,
)
from .privacy.bounds import rero_gaussian, run_bounds, step_bounds
from .privacy.empirical import SHADOW_NOTE, EmpiricalPrivacy
from .privacy.measured import NonFiniteMeasurement, RunEvidence, measured_epsilon
from .reconstruct.prior import DiffusionPrior
from .record import (
    AuditRecord,
    CheckEntry,
    Counts,
    ImageScore,
    MissedImage,
    Targets,
    validity,
)
from .score.baseline import Baseline, Baselines, estimate_baselines
from .score.identification import Identification, identify
from .score.metrics import LPIPS
from .score.scoring import ScoredStep, score_step
from .score.targets import count_targets
from .timing import stage

__all__ = ["AuditPipeline", "AuditResult", "STAGE_NAMES"]

logger = logging.getLogger(__name__)

#: The stages an audit record can name in ``stage_errors``.
STAGE_NAMES = (
    "shadow",
    "scoring",
    "prior",
    "metrics",
    "identification",
    "prior_fit",
    "checks",
    "bounds",
    "measured",
)


class ShadowInputError(ValueError):
    """A batch a shadow audit cannot simulate an imprint on (not images)."""


#: The timing stage (:data:`~.timing.STAGE_ORDER`) of each failure-tolerant pipeline stage;
#: the rest (measured ε, bounds) is the privacy arithmetic.
_TIMED_AS = {"checks": "checks", "prior_fit": "prior fit", "identification": "identification"}


def _stage_of(err: BaseException, default: str = "scoring") -> str:
    """Which stage of scoring raised ``err``: ``"prior"``, ``"metrics"`` or ``default``."""
    tb = err.__traceback__
    stage = default
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if name.endswith(("reconstruct/prior.py", "reconstruct/sampler.py")) or "diffusers" in name:
            stage = "prior"
        elif name.endswith("score/metrics.py") or "/lpips" in name:
            stage = "metrics"
        tb = tb.tb_next
    return stage


def _check_shadow_public(shadow) -> None:
    """Public images the shadow adversary cannot calibrate on are refused now, at attach (NaN
    pixels, fewer images than the smallest sized simulation or than the bins given), not at the
    first audit."""
    from .capture.shadow import MIN_BINS

    public = getattr(shadow, "public", None)
    if public is None:
        return
    if getattr(shadow, "given_bins", None) is None and public.shape[0] < MIN_BINS:
        raise ValueError(
            f"the public= images cannot calibrate the shadow adversary's bins: {public.shape[0]} "
            f"images, fewer than the {MIN_BINS} bins of its smallest simulation (equal-mass bins "
            "need one public image per bin; a batch of B wants about 9.5·B). Pass more public "
            "images, or ShadowAdversary(num_bins=...) to fix fewer bins knowingly"
        )
    try:
        shadow.block(tuple(public.shape[1:]))  # calibrates, as the first audit would
    except ValueError as err:
        raise ValueError(
            f"the public= images cannot calibrate the shadow adversary's bins: {err}"
        ) from None


def _orders(accountant):
    """The RDP orders of the user's accountant (Opacus's defaults for other kinds)."""
    try:
        return rdp_orders(accountant)
    except Exception:
        return None


class AuditResult:
    """Tensors of one audit, kept in memory for image sinks (the log holds only numbers).

    Attributes:
        record: the typed record (:class:`~opacus_dmaudit.record.AuditRecord`) the log writes.
        truth: ``(M, C, H, W)`` matched real images (in [0, 1]).
        raw: ``(M, C, H, W)`` raw readouts, clipped to [0, 1].
        clean: ``(M, C, H, W)`` readouts of the clean clipped sum, clipped to [0, 1].
        dm: ``(M, C, H, W)`` DM reconstructions of the raw readouts (``None`` without a prior).
        missed_truth, missed_raw: a few lone images the occupancy test missed, and their raw
            readouts (``None`` if none were missed).
    """

    def __init__(
        self, record: AuditRecord, truth, raw, clean, dm=None, missed_truth=None, missed_raw=None
    ) -> None:
        self.record, self.truth, self.raw, self.clean, self.dm = record, truth, raw, clean, dm
        self.missed_truth, self.missed_raw = missed_truth, missed_raw

    @property
    def has_images(self) -> bool:
        """Whether there is any image to save (found, or missed and shown for why)."""
        return self.truth.shape[0] > 0 or self.missed_truth is not None


class AuditPipeline:
    """Computes audit records for one run.

    Args:
        config: the run's :class:`~opacus_dmaudit.config.AuditConfig`.
        prior: the diffusion prior, or ``None``.
        lpips: the LPIPS model when ``"lpips"`` is among the metrics.
        generator: the auditor's own generator (never the global RNG).
    """

    def __init__(
        self,
        *,
        config: AuditConfig,
        prior: DiffusionPrior | None,
        lpips: LPIPS | None,
        generator: torch.Generator,
    ) -> None:
        self.config = config
        self.prior = prior
        self.lpips = lpips
        self.generator = generator
        self.shadow = None  # the simulated adversary of shadow audits (set by prepare)
        self.baselines = Baselines()  # what a guess achieves, measured once on public images
        self.prior_fit: PublicFit | None = None  # the prior's fit on public images
        self.prior_fit_missing: str | None = None  # why it is not measured (fit unknown)
        self.empirical = EmpiricalPrivacy(delta=config.delta)
        self.evidence = RunEvidence()  # the run's pooled mechanism evidence
        self.expected_batch_size: int | None = None  # set by prepare
        self._explained: set[str] = set()  # ε notes already explained in the log
        self._failed_stages: set[str] = set()  # stages whose failure was logged

    # -- once per run ----------------------------------------------------------------------------
    def prepare(
        self,
        block: ImprintBlock | None,
        *,
        mode: str,
        expected_batch_size: int | None = None,
    ) -> None:
        """Set up what every audit of the run shares, before training goes on.

        Args:
            block: the run's ``ImprintBlock`` (``None`` for shadow or mechanism-only audits).
            mode: ``"imprint"``, ``"shadow"`` (simulate the worst-case imprint adversary) or
                ``"mechanism"``, as the auditor decided at attach.
            expected_batch_size: the optimizer's expected batch size: the shadow adversary's
                bins and the identification baselines are sized to it.
        """
        self.shadow = None
        self.expected_batch_size = expected_batch_size
        if mode == "shadow":
            from .capture.shadow import ShadowAdversary

            given = self.config.shadow
            self.shadow = (
                given
                if isinstance(given, ShadowAdversary)
                else ShadowAdversary(public=self.config.public)
            )
            public, _ = self._public_images(None)
            if public is not None and public.dim() == 4:  # the image shape is known now
                self.shadow.size_for(expected_batch_size, tuple(public.shape[1:]))
            _check_shadow_public(self.shadow)
        self.baselines = self._measure_baselines(block)
        with stage("prior fit"):
            self.prior_fit = self._fit_prior_public(block)

    @property
    def baseline(self) -> Baseline | None:
        """The success baseline (κ̂ and its upper limit), or ``None``."""
        return self.baselines.success

    def _public_images(self, block: ImprintBlock | None) -> tuple[torch.Tensor | None, str]:
        """The run's public images: ``config.public``, else what ``calibrate`` kept."""
        if self.config.public is not None:
            return torch.as_tensor(self.config.public), "public images (AuditConfig.public)"
        if block is not None and block.public_sample is not None:
            return block.public_sample, "public images (from ImprintBlock.calibrate)"
        return None, ""

    def _value_range(self, block: ImprintBlock | None) -> tuple[float, float]:
        holder = block if block is not None else self.shadow
        return tuple(getattr(holder, "value_range", (0.0, 1.0)))

    def _geometry(self, block: ImprintBlock | None, shape: tuple[int, ...]):
        """The bins the audits read through (the live block's, or the shadow's for ``shape``)."""
        if block is not None:
            return block.geometry()
        if self.shadow is not None and len(shape) == 3:
            try:
                return self.shadow.block(shape).geometry()
            except Exception:  # the baselines are context; they must never stop training
                logger.exception("could not build the shadow adversary's bins for the baselines")
        return None

    def _measure_baselines(self, block: ImprintBlock | None) -> Baselines:
        """Every baseline of the run from public images, never the audited batch.

        Cached across runs on the same images (see :func:`~.score.baseline.estimate_baselines`).
        """
        if block is None and self.shadow is None:
            return Baselines()  # mechanism checks only: no reconstruction, no success rate
        public, _ = self._public_images(block)
        if public is None:
            reason = (
                "no public images (AuditConfig.public or ImprintBlock.calibrate): what a guess "
                "without the gradient achieves is not measured"
            )
            logger.info("%s; the verdict tests no success or identification claim", reason)
            return Baselines(missing={"success": reason, "identification": reason})
        shape = tuple(getattr(block, "image_shape", ()) or ())
        if shape and tuple(public.shape[1:]) != shape:
            reason = (
                f"the public images' shape {tuple(public.shape[1:])} does not fit the imprint "
                f"block's {shape}"
            )
            logger.warning("%s: no baseline is measured", reason)
            return Baselines(missing={"success": reason, "identification": reason})
        logger.info(
            "measuring what a guess without the gradient achieves, on %d public images (once, "
            "at attach; cached for later runs in this process)",
            len(public),
        )
        try:
            with stage("κ̂"):
                return estimate_baselines(
                    public,
                    metric=self.config.success_metric,
                    threshold=self.config.success_threshold,
                    metrics=self.config.metrics,
                    batch_size=self.expected_batch_size,
                    geometry=self._geometry(block, tuple(public.shape[1:])),
                    value_range=self._value_range(block),
                    lpips=self.lpips,
                    prior=self.prior,
                    seed=self.config.seed,
                )
        except Exception as err:  # the baseline is context; it must never stop training
            logger.exception("measuring the baselines failed")
            reason = f"measuring the baselines failed ({type(err).__name__}: {err})"
            return Baselines(missing={"success": reason, "identification": reason})

    def _fit_prior_public(self, block: ImprintBlock | None) -> PublicFit | None:
        """The ``prior_fit`` check on public images (see :mod:`.prior_fit`); without it
        :attr:`prior_fit_missing` says why (the fit is then unknown, never passed)."""
        self.prior_fit_missing = None
        if self.prior is None or (block is None and self.shadow is None):
            return None
        if self.config.prior_fit_public < 1:
            self.prior_fit_missing = (
                "the prior-fit check on public images is off (prior_fit_public=0)"
            )
            return None
        public, source = self._public_images(block)
        if public is None:
            self.prior_fit_missing = (
                "no public images (AuditConfig.public or ImprintBlock.calibrate) to measure the "
                "prior's fit on"
            )
            logger.info("%s: the prior's fit is unknown", self.prior_fit_missing)
            return None
        try:
            self.prior.check_fits(tuple(public.shape[1:]))
            fit = public_fit(
                public,
                self.prior,
                config=self.config,
                lpips=self.lpips,
                # its own generator: resuming replays the audits' draws exactly
                generator=torch.Generator().manual_seed(self.config.seed + 1),
                value_range=self._value_range(block),
                images=self.config.prior_fit_public,
                source=source,
            )
        except Exception as err:  # the audit must never take training down
            logger.exception("the prior-fit check on public images failed; audits go on")
            self.prior_fit_missing = f"measuring it failed ({type(err).__name__}: {err})"
            return None
        if fit.check["status"] != "pass":
            logger.warning("prior_fit: %s", fit.check["detail"])
        return fit

    # -- every audit -----------------------------------------------------------------------------
    def restore(self, records) -> None:
        """Pool the evidence of the records a resumed run keeps (the noise, batch sizes, signs
        and membership scores of every audit before the checkpoint)."""
        self.evidence = RunEvidence()
        self.evidence.restore(records)
        self.empirical = EmpiricalPrivacy(delta=self.config.delta)
        self.empirical.restore(records)

    def run(
        self,
        captured: CapturedStep,
        *,
        accountant,
        mode: str | None,
        expected_batch_size: int | None,
    ) -> AuditResult:
        """Check, score and describe one captured step.

        A stage that fails (shadow, scoring, prior, metrics, identification, prior fit, checks,
        bounds, measured numbers) is recorded in the record's ``stage_errors`` with its reason,
        and everything else is still computed and written.

        Args:
            captured: the step the capture (or a shadow) recorded.
            accountant: the Opacus accountant as of that step (``None``: no ε).
            mode: ``"imprint"``, ``"shadow"`` or ``"mechanism"`` (recorded; a shadow audit whose
                batch cannot be simulated is recorded as ``"mechanism"``).
            expected_batch_size: the optimizer's expected batch size (for κ = 1/N).
        """
        # the metrics, the identification criterion and the prior-fit check score the same
        # images: LPIPS computes each image's features once per audit
        shared = self.lpips.shared_features() if self.lpips is not None else nullcontext()
        with shared:
            return self._run(
                captured, accountant=accountant, mode=mode, expected_batch_size=expected_batch_size
            )

    def _run(
        self,
        captured: CapturedStep,
        *,
        accountant,
        mode: str | None,
        expected_batch_size: int | None,
    ) -> AuditResult:
        start = time.perf_counter()
        errors: list[dict[str, str]] = []
        with stage("readout"):  # the prior and the metrics inside mark their own time
            if captured.imprint is None and self.shadow is not None:
                simulated = self._simulate(captured, errors)
                mode = "mechanism" if simulated is None else mode
                captured = simulated or captured
            prior, refusal = self._prior_for(captured)
            scored = self._score(captured, errors, prior) if captured.imprint is not None else None
        evidence = self._stage("measured", errors, self.evidence.add, captured) or {}
        checks = self._stage("checks", errors, validity_checks, captured) or []
        if self.config.mechanism_checks:
            mech = self._stage("checks", errors, mechanism_checks, captured, self.evidence)
            checks = checks + (mech or [])
        fit = ([refusal], None) if refusal is not None else None
        if fit is None and all(e["stage"] != "prior" for e in errors):
            # the prior's fit needs the prior: not again once it failed here
            fit = self._stage("prior_fit", errors, self._prior_fit_checks, scored)
        fit_checks, fit_summary = fit if fit is not None else ([], None)
        measured = self._stage("measured", errors, self._membership, captured, accountant, mode)
        membership, privacy_measured = measured if measured is not None else (None, None)
        if membership:
            evidence["membership"] = membership
        with stage("privacy"):
            reading = read_epsilon(
                accountant,
                delta=self.config.delta,
                noise_multiplier=captured.noise_multiplier,
                explained=self._explained,
            )
        parts = {
            "checks": [CheckEntry.from_json(c) for c in checks + fit_checks],
            "prior_fit": fit_summary,
            "privacy_measured": privacy_measured,
            "reading": reading,
            "epsilon_measured": self._stage(
                "measured", errors, self._measured, accountant, reading.epsilon
            ),
            "evidence": evidence or None,
            "errors": errors,
        }
        with stage("privacy"):  # ε, κ, the bounds; identification marks its own time
            record = self._record(
                captured,
                scored,
                parts,
                accountant=accountant,
                mode=mode,
                expected_batch_size=expected_batch_size,
                start=start,
            )
        if scored is None:
            empty = torch.zeros((0,))
            return AuditResult(record, empty, empty, empty, None)
        return AuditResult(
            record,
            scored.truth,
            scored.raw,
            scored.clean,
            scored.dm,
            missed_truth=scored.missed_truth,
            missed_raw=scored.missed_raw,
        )

    def _stage(self, name: str, errors: list[dict[str, str]], fn, *args):
        """``fn(*args)``, or ``None`` with the failure recorded (and logged once per stage)."""
        try:
            with stage(_TIMED_AS.get(name, "privacy")):
                return fn(*args)
        except Exception as err:  # one stage must never cost the audit its other results
            self._stage_failed(name, err, errors)
            return None

    def _stage_failed(self, name: str, err: BaseException, errors: list[dict[str, str]]) -> None:
        text = f"{type(err).__name__}: {err}"
        errors.append({"stage": name, "error": text})
        if name not in self._failed_stages:
            self._failed_stages.add(name)
            logger.warning(
                "audit stage %r failed (%s); the audit records everything else and says which "
                "stage is missing (logged once per stage)",
                name,
                text,
                exc_info=not isinstance(err, ShadowInputError | NonFiniteMeasurement),
            )

    def _simulate(self, captured: CapturedStep, errors: list[dict[str, str]]):
        """The shadow adversary's capture, or ``None`` (a mechanism-only audit) when the batch
        cannot be simulated: not images, or a dict/tuple batch without an image tensor."""
        try:
            if captured.inputs.numel() == 0 and captured.input_kind is not None:
                raise ShadowInputError(
                    f"the model's batch is a {captured.input_kind} without an image tensor (or "
                    "under a name the capture does not know): shadow audits simulate an imprint "
                    "on images, so this audit checks the mechanism only. Pass the images as the "
                    "model's first argument, or as pixel_values=/images=/x=, to simulate"
                )
            try:
                return self.shadow.simulate(
                    captured, generator=self.generator, expected_batch_size=self.expected_batch_size
                )
            except ValueError as err:
                if "shadow audits" in str(err):
                    raise ShadowInputError(f"{err} This audit checks the mechanism only.") from err
                raise
        except Exception as err:
            self._stage_failed("shadow", err, errors)
            return None

    def _score(
        self, captured: CapturedStep, errors: list[dict[str, str]], prior: DiffusionPrior | None
    ) -> ScoredStep | None:
        """Scoring with the prior; when the prior (or its sampler) fails, the raw readout without
        it; when scoring itself fails, nothing (the record says which stage failed)."""
        try:
            return score_step(
                captured, self.config, prior=prior, lpips=self.lpips, generator=self.generator
            )
        except Exception as err:
            where = _stage_of(err)
            self._stage_failed(where, err, errors)
            if where != "prior" or prior is None:
                return None
        try:  # the raw readout without the prior
            return score_step(
                captured, self.config, prior=None, lpips=self.lpips, generator=self.generator
            )
        except Exception as err:
            self._stage_failed(_stage_of(err, "scoring"), err, errors)
            return None

    def _membership(self, captured: CapturedStep, accountant, mode: str | None):
        """``(this audit's membership scores or None, privacy_measured)``."""
        if mode == "shadow":
            return None, {"note": SHADOW_NOTE}
        scores = self.empirical.add(captured)
        history = history_from_accountant(accountant)
        estimate = self.empirical.estimate(
            history=history, kind=accountant_kind(accountant), orders=_orders(accountant)
        )
        return scores, estimate

    def _measured(self, accountant, claimed: float | None) -> dict[str, Any] | None:
        """ε̂ of the run so far, its interval and basis (:mod:`.privacy.measured`)."""
        if accountant is None:
            return None
        return measured_epsilon(
            self.evidence,
            kind=accountant_kind(accountant),
            history=history_from_accountant(accountant),
            delta=self.config.delta,
            orders=_orders(accountant),
            claimed=claimed,
        )

    def _prior_for(self, captured: CapturedStep) -> tuple[DiffusionPrior | None, dict | None]:
        """The prior for this step's images, or ``None`` and a failed ``prior_fit`` entry when
        they do not fit it (a shadow run whose image shape was not known at attach)."""
        if self.prior is None or captured.imprint is None:
            return self.prior, None
        shape = tuple(captured.imprint.geometry.image_shape)
        try:
            self.prior.check_fits(shape)
        except ValueError as err:
            from .checks.entries import check

            return None, check(
                "prior_fit",
                "fail",
                f"the prior does not fit this run's images of shape {shape}: {err} No DM "
                "reconstruction was made; pass a prior for these images, or prior=None",
            )
        return self.prior, None

    def _prior_fit_checks(
        self, scored: ScoredStep | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The prior-fit checks of one audit, and its ``prior_fit`` summary; flags its images."""
        if scored is None or self.prior is None:
            return [], None
        if self.prior_fit is not None:
            checks = [self.prior_fit.check]
        else:
            checks = [unknown_fit(self.prior_fit_missing or "the prior's fit was not measured")]
        fit = audit_fit(
            scored,
            self.prior,
            config=self.config,
            lpips=self.lpips,
            generator=self.generator,
            public=self.prior_fit,
            images=self.config.prior_fit_audit,
        )
        if fit is None:
            return checks, None
        for row, flags in fit.flags.items():
            scored.images[row].update(flags)
        return checks + [fit.check], fit.summary

    def kappa(
        self, sample_rate: float | None, expected_batch_size: int | None
    ) -> tuple[float | None, float | None, float | None]:
        """``(κ used, κ̂, κ uniform = 1/N)``, N = expected batch size / sampling rate.

        κ used: ``config.kappa`` when set, else the success baseline's upper limit (the fixed
        and bin-knowing guesses, held out); without public images 1/N, for the bounds only (the
        verdict states no bound and tests no success claim on it).
        """
        uniform = None
        if sample_rate and expected_batch_size:
            n = round(expected_batch_size / sample_rate)
            uniform = 1.0 / n if n > 1 else None
        base = self.baseline
        measured = base.kappa if base is not None else None
        if self.config.kappa is not None:
            return self.config.kappa, measured, uniform
        if base is not None:
            return base.kappa_upper, measured, uniform
        return uniform, measured, uniform

    def _targets(self, identification, scored: ScoredStep) -> Targets:
        """The record's per-target counts with the baselines they are tested against."""
        base = self.baselines
        baselines: dict[str, Any] = {
            "identification": {m: b.upper for m, b in base.identification.items()},
            "identification_informed": {
                m: b.informed_upper for m, b in base.identification.items()
            },
        }
        missing = dict(base.missing)
        if self.config.kappa is not None:
            baselines.update(success=self.config.kappa, success_basis="configured")
            missing.pop("success", None)
        elif base.success is not None:
            baselines.update(success=base.success.kappa_upper, success_basis="measured")
        return count_targets(
            scored, identification, self.config, baselines=baselines, missing=missing
        )

    def _record(
        self,
        captured: CapturedStep,
        scored: ScoredStep | None,
        parts: dict[str, Any],
        *,
        accountant,
        mode: str | None,
        expected_batch_size: int | None,
        start: float,
    ) -> AuditRecord:
        """The record of one audit, built once (its fields: :class:`~.record.AuditRecord`)."""
        cfg = self.config
        sigma = captured.noise_multiplier
        sample_rate = sample_rate_from_accountant(accountant)
        kappa, kappa_baseline, kappa_uniform = self.kappa(sample_rate, expected_batch_size)
        reading = parts["reading"]
        measured = parts["privacy_measured"]
        history = history_from_accountant(accountant)
        errors = parts["errors"]
        bounds = self._stage(
            "bounds", errors, self._bounds, captured, scored, kappa, measured, history
        )
        epsilon_measured = parts["epsilon_measured"] or {}
        return AuditRecord(
            step=captured.step,
            mode=mode,
            epsilon=reading.epsilon,
            epsilon_accountant=reading.accountant,
            epsilon_note=reading.note,
            delta=cfg.delta,
            noise_multiplier=sigma,
            mu_step=(1.0 / sigma) if sigma > 0 else math.inf,
            max_grad_norm=captured.max_grad_norm,
            sample_rate=sample_rate,
            clipping=captured.clipping,
            batch_size=captured.batch_size,
            **(self._scores(captured, scored, errors) if scored is not None else {}),
            kappa=kappa,
            kappa_baseline=kappa_baseline,
            kappa_uniform=kappa_uniform,
            # this step's own event (the one `success` measures) and, apart, the whole run's
            bounds=bounds[0] if bounds else None,
            run_bounds=bounds[1] if bounds else None,
            privacy_measured=measured,
            denoiser=self._denoiser() if scored is not None else None,
            checks=parts["checks"],
            valid=validity(parts["checks"]),
            prior_fit=parts["prior_fit"],
            audit_seconds=time.perf_counter() - start,
            epsilon_measured=epsilon_measured.get("epsilon_measured"),
            epsilon_measured_ci=epsilon_measured.get("epsilon_measured_ci"),
            epsilon_measured_basis=epsilon_measured.get("epsilon_measured_basis"),
            evidence=parts["evidence"],
            stage_errors=errors,
        )

    def _bounds(self, captured, scored, kappa, measured, history):
        """``(bounds of this step, bounds of the whole run)``; identification's κ is the informed
        adversary's upper limit in the success metric (the ReRo theorem's adversary), and without
        it there is no identification bound."""
        sigma = captured.noise_multiplier
        step = step_bounds(
            noise_multiplier=sigma,
            kappa=kappa,
            mu_measured=(measured or {}).get("mu_step_measured"),
        )
        informed = self.baselines.identification.get(
            "mse" if self.config.success_metric == "psnr" else self.config.success_metric
        )
        if scored is not None and informed is not None and informed.informed_upper is not None:
            mu = 1.0 / sigma if sigma > 0 else math.inf
            step["single_step_identification"] = rero_gaussian(mu, informed.informed_upper)
        run = run_bounds(kappa=kappa, history=history) if kappa and history else None
        return step or None, run

    def _scores(
        self, captured: CapturedStep, scored: ScoredStep, errors: list[dict[str, str]]
    ) -> dict[str, Any]:
        """The record's readout and score fields of a scored step."""
        cfg = self.config
        batch = captured.batch_size
        rows = iter(range(len(scored.truth_index)))
        images = [
            ImageScore.from_json(d, row=None if t is None else next(rows))
            for d, t in zip(scored.images, scored.truth_index)
        ]
        ident = self._stage("identification", errors, self._identification, scored, captured)
        detection = dict(scored.detection)
        if self.shadow is not None and self.shadow.plan is not None:
            detection["shadow"] = self.shadow.plan.to_json()
        return {
            "counts": Counts.from_json(scored.counts, "counts"),
            "detection": detection,
            "means": scored.summary(cfg.metrics),
            "success_criterion": cfg.success_criterion,
            # exposure: the share of the batch's samples reconstructed to the criterion
            "success": {
                stage: (n / batch if batch else None) for stage, n in scored.success.items()
            },
            # exposure: the share of the batch whose reconstruction is nearest its own image
            "identification": ident.shares if ident is not None else None,
            "targets": self._targets(ident, scored) if ident is not None else None,
            "images": images,
            "missed": [MissedImage.from_json(m) for m in scored.missed],
        }

    def _identification(self, scored: ScoredStep, captured: CapturedStep) -> Identification:
        """Identification in every distance and stage (:func:`~.score.identification.identify`)."""
        return identify(
            scored,
            captured,
            metrics=self.config.metrics,
            success_metric=self.config.success_metric,
            lpips=self.lpips,
        )

    def _denoiser(self) -> dict[str, Any] | None:
        """How the DM reconstructions were made (``None`` without a prior)."""
        if self.prior is None:
            return None
        # {"sampler", "steps", "min_stride"}: the sampler's name, its steps where they apply
        return {"prior": self.prior.source, **self.config.sampler.describe()}
