"""The verdict decides per target: k of n against a baseline's upper limit, with power.

The records here are what the pipeline writes (a ``targets`` part per audit); the real runs that
produce them are in ``tests/score/test_targets.py``.
"""

from __future__ import annotations

import pytest
from scipy import stats

from opacus_dmaudit.record import AuditRecord
from opacus_dmaudit.score import binomial
from opacus_dmaudit.sinks.summary import summarize
from tests.test_record import V2

BASELINES = {
    "success": 0.2,
    "success_basis": "measured",
    "identification": {"mse": 0.05, "ssim": 0.05, "lpips": 0.05},
    "identification_informed": {"mse": 0.04, "ssim": 0.04, "lpips": 0.04},
}


def _record(step, *, attempted, success=None, identified=None, batch=64, **over) -> AuditRecord:
    targets = {
        "attempted": attempted,
        "success": success or {"raw": 0, "dm": 0},
        "identified": identified or {m: {"raw": 0, "dm": 0} for m in ("mse", "ssim", "lpips")},
        "baselines": over.pop("baselines", BASELINES),
        "missing": over.pop("missing", {}),
    }
    data = {**V2, "step": step, "batch_size": batch, "targets": targets}
    if "shares" in over:  # the batch shares (exposure)
        data["success"] = over.pop("shares")
    data["true_singletons"] = data["found_singletons"] = attempted
    data.update(over)
    return AuditRecord.from_json(data)


def _ident(mse=0, ssim=0, lpips=0, stage="raw"):
    other = "dm" if stage == "raw" else "raw"
    return {m: {stage: k, other: 0} for m, k in (("mse", mse), ("ssim", ssim), ("lpips", lpips))}


def test_the_batch_share_is_exposure_never_compared_with_kappa():
    # one audit of a batch of 640: 20 lone digits, every one read to the criterion. As a share of
    # the batch that is 3 % (< κ = 0.2); per target it is 20 of 20 against ≤ 0.2 each.
    r = _record(10, attempted=20, success={"raw": 20, "dm": 20}, batch=640,
                shares={"raw": 20 / 640, "dm": 20 / 640})  # fmt: skip
    s = summarize([r])
    assert s.verdict.status == "leakage", s.verdict.text
    assert "20 of 20 targets reconstructed" in s.verdict.text
    assert s.verdict.headline.startswith("Training images were reconstructed")
    assert s.exposure["success"]["raw"] == pytest.approx(20 / 640)
    assert "Exposure" in s.verdict.text


def test_counts_and_the_test_are_printed_never_none():
    # 9 of 65 identified in MSE against ≤ 3.2 expected by chance: p ≈ 0.004 — suggestive, not
    # leakage at the run's level split over six tests, and never "none identified"
    p0 = 3.2 / 65
    base = {**BASELINES, "identification": {m: p0 for m in ("mse", "ssim", "lpips")}}
    r = _record(10, attempted=65, identified=_ident(mse=9), baselines=base)
    s = summarize([r])
    assert s.verdict.status == "inconclusive", s.verdict.text
    assert "9 of 65 targets identified in MSE, against ≤ 3.2 expected" in s.verdict.text
    expected = stats.binomtest(9, 65, p0, alternative="greater").pvalue
    assert f"p = {expected:.2g}" in s.verdict.text
    assert "none" not in s.verdict.text.lower()
    test = next(t for t in s.targets.tests if t.metric == "mse" and t.stage == "raw")
    assert test.p_value == pytest.approx(expected)


def test_identification_in_any_distance_counts_and_the_raw_readout_drops_the_qualifier():
    # LPIPS never identifies; MSE does, 20 of 65 (against ≤ 3.2): leakage, with the raw readout
    p0 = 3.2 / 65
    base = {**BASELINES, "identification": {m: p0 for m in ("mse", "ssim", "lpips")}}
    r = _record(10, attempted=65, identified=_ident(mse=20), baselines=base)
    v = summarize([r]).verdict
    assert v.status == "leakage" and "20 of 65 targets identified in MSE" in v.text
    assert v.headline == "Reconstructions single out their own training images."
    # success only with the prior, identification by the raw readout: no "(only with the prior)"
    r = _record(10, attempted=65, identified=_ident(ssim=30), baselines=base,
                success={"raw": 0, "dm": 40})  # fmt: skip
    v = summarize([r]).verdict
    assert v.status == "leakage" and "only with the diffusion prior" not in v.headline
    # everything only with the prior: the qualifier
    r = _record(10, attempted=65, identified=_ident(ssim=30, stage="dm"), baselines=base,
                success={"raw": 0, "dm": 40})  # fmt: skip
    assert "(only with the diffusion prior)" in summarize([r]).verdict.headline


def test_a_negative_verdict_needs_power_and_says_how_many_more_targets():
    # nothing above any baseline, but 12 targets: too thin (the max_images=2 run of the issue)
    thin = [_record(i, attempted=2, success={"raw": 0, "dm": 0}) for i in range(1, 7)]
    v = summarize(thin).verdict
    assert v.status == "inconclusive", v.text
    assert "No visible leakage" not in v.headline and "not evidence" not in v.text
    t = summarize(thin).targets
    more = t.needed - t.attempted
    assert f"About {more} more targets" in v.text
    assert f"about {-(-more // 2)} more audits" in v.text  # 2 targets per audit recently
    # the same rates over enough targets earn it, and say the alternative
    enough = [_record(i, attempted=200) for i in range(1, 4)]
    v = summarize(enough).verdict
    assert v.status == "no_visible_leakage", v.text
    assert "power ≥ 90% against a per-target rate 0.1 above its baseline" in v.text
    # one audit, as many targets: the same (pooling changes nothing but n)
    assert summarize([_record(1, attempted=600)]).verdict.status == "no_visible_leakage"


def test_an_audit_that_lost_a_stage_earns_no_negative_verdict():
    """Enough powerful targets, nothing above a baseline: negative, unless a stage of an audit
    failed (its evidence is missing); then the verdict says which stage, in how many audits."""
    enough = [_record(i, attempted=200) for i in range(1, 4)]
    assert summarize(enough).verdict.status == "no_visible_leakage"
    lost = {"stage_errors": [{"stage": "metrics", "error": "ValueError: metric exploded"}]}
    records = enough[:2] + [_record(3, attempted=200, **lost)]
    summary = summarize(records)
    assert summary.failed_stages == {"metrics": 1}
    v = summary.verdict
    assert v.status == "inconclusive", v.text
    assert "No visible leakage" not in v.headline and "not evidence" not in v.text
    assert "Stages of the audit failed (metrics in 1 audit;" in v.text


def test_successes_at_the_baseline_are_not_evidence_only_with_power():
    records = [_record(i, attempted=200, success={"raw": 30, "dm": 40}) for i in range(1, 4)]
    v = summarize(records).verdict  # 70 of 600 against ≤ 0.2 per target
    assert v.status == "not_above_baseline", v.text
    assert "not evidence of leakage" in v.text


def test_batch_of_one_cannot_test_identification_and_never_passes_on_little():
    missing = {"identification": "a batch of one: identification is no test"}
    base = {"success": 0.2, "success_basis": "measured"}
    records = [
        _record(i, attempted=1, batch=1, baselines=base, missing=missing,
                identified={m: {"raw": 1, "dm": 1} for m in ("mse", "ssim", "lpips")})
        for i in range(1, 7)
    ]  # fmt: skip
    s = summarize(records)
    assert all(t.kind == "success" for t in s.targets.tests)
    assert s.verdict.status == "inconclusive", s.verdict.text
    assert "batch of one" in s.verdict.text


def test_without_public_images_no_success_claim_rests_on_one_over_n():
    reason = "no public images (AuditConfig.public or ImprintBlock.calibrate)"
    r = _record(10, attempted=10, success={"raw": 1, "dm": 1}, baselines={},
                missing={"success": reason, "identification": reason},
                kappa=1e-4, kappa_baseline=None, kappa_uniform=1e-4)  # fmt: skip
    v = summarize([r]).verdict
    assert v.status == "inconclusive", v.text
    assert "public images" in v.headline
    assert "success baseline is missing" in v.text and "1/N is no valid baseline" in v.text


def test_records_of_an_earlier_release_are_never_read_as_no_leakage():
    old = {k: v for k, v in V2.items() if k != "targets"}
    v = summarize([AuditRecord.from_json({**old, "step": i}) for i in (10, 20)]).verdict
    assert v.status == "inconclusive" and "earlier release" in v.text


def test_the_test_and_its_power_are_exact():
    alpha = 1e-3 / 6
    for p0 in (0.01, 0.05, 0.2):
        n = binomial.targets_needed(p0, alpha)
        assert binomial.power(n, p0, alpha) >= 0.9 > binomial.power(n - 1, p0, alpha)
        k = int(binomial.critical_count(n, p0, alpha))
        assert stats.binom.sf(k - 1, n, p0) <= alpha < stats.binom.sf(k - 2, n, p0)
    assert binomial.p_value(9, 65, 0.05) == pytest.approx(
        stats.binomtest(9, 65, 0.05, alternative="greater").pvalue
    )
    assert binomial.alternative(0.95) == 1.0


def test_mechanism_checks_without_an_accountant_never_say_it_matched():
    """No privacy_engine: the accountant check warns, so the verdict cannot say the mechanism
    matched the accountant (a new user's run without an engine read so)."""
    checks = [{"name": "noise_scale", "status": "pass", "detail": "σ as claimed"}]
    none = {"name": "accountant", "status": "warn", "detail": "no accountant to compare with"}
    ok = {"name": "accountant", "status": "pass", "detail": "ε as recomputed"}
    base = {**V2, "step": 1, "mode": "mechanism"}
    v = summarize([AuditRecord.from_json({**base, "checks": [*checks, none]})]).verdict
    assert v.status == "mechanism_ok" and "matched" not in v.headline, v.headline
    assert "no accountant was compared" in v.headline and "no accountant to compare" in v.text
    v = summarize([AuditRecord.from_json({**base, "checks": [*checks, ok]})]).verdict
    assert v.headline == "The DP mechanism matched the accountant at every audit."
