"""Per-target counts from real audits: targets are the lone samples found and scored.

``max_images`` changes how many targets an audit attempts, never the denominator; a batch of one
cannot test identification; the run's verdict is decided per target (``tests/sinks/test_verdict.py``
has the rules on written records).
"""

from __future__ import annotations

from opacus_dmaudit.schema import meets
from tests.helpers import audited_run


def test_max_images_changes_how_many_targets_never_the_denominator(mnist5k, tmp_path):
    runs = {}
    for cap in (None, 2):
        auditor, _ = audited_run(
            mnist5k,
            tmp_path / str(cap),
            sigma=0.05,
            steps=4,
            every=2,
            metrics=("mse", "ssim"),
            max_images=cap,
            close=True,
        )
        runs[cap] = auditor
    for r in runs[None].history + runs[2].history:
        t = r.targets
        lone = [im for im in r.scored if im.true_count == 1]
        assert t.attempted == len(lone)  # every lone sample scored is a target, once
        assert set(t.identified) == {"mse", "ssim"}  # every distance the audit computes
        for by_stage in t.identified.values():
            assert set(by_stage) == {"raw"} and 0 <= by_stage["raw"] <= t.attempted
        crit = r.success_criterion
        assert t.success["raw"] == sum(
            meets(crit.metric, im.metric(crit.metric, "raw"), crit.threshold) for im in lone
        )
    assert all(r.targets.attempted <= 2 for r in runs[2].history)
    full, capped = runs[None].close(), runs[2].close()
    assert capped.targets.attempted <= 4 < full.targets.attempted
    # the test counts targets: two per audit cannot earn a negative verdict
    assert full.verdict.status == "leakage", full.verdict.text
    assert capped.verdict.status in ("leakage", "inconclusive"), capped.verdict.text
    assert capped.targets.per_audit <= 2


def test_a_batch_of_one_never_reads_as_no_leakage(mnist5k, tmp_path):
    """Batches of one (Poisson, expected size 1) at σ = 0.05: identification is no test there,
    and a handful of targets earns no negative verdict (release 0.1 said "No visible leakage")."""
    auditor, _ = audited_run(
        mnist5k,
        tmp_path,
        sigma=0.05,
        steps=8,
        metrics=("mse", "ssim"),
        private={"batch_size": 1},
        close=True,
    )
    s = auditor.close()
    assert s.targets is not None
    assert s.targets.attempted <= sum(r.batch_size for r in auditor.history) <= 20
    assert "batch of one" in s.targets.missing["identification"]
    assert all(t.kind == "success" for t in s.targets.tests)
    assert s.verdict.status not in ("no_visible_leakage", "not_above_baseline"), s.verdict.text
    assert "batch of one" in s.verdict.text
