"""The run summary: each group of the records adds up as it says, and it reads back from JSON."""

from __future__ import annotations

import pytest

from opacus_dmaudit.record import AuditRecord
from opacus_dmaudit.sinks.summary import RunSummary, summarize, summary_from_json
from opacus_dmaudit.sinks.verdict import RULES, VERDICT_STATUSES
from tests.test_record import V2


def _record(step: int, **changes) -> AuditRecord:
    return AuditRecord.from_json({**V2, "step": step, **changes})


def test_success_and_identification_add_up_over_audits():
    records = [
        _record(10, success={"raw": 0.0, "dm": 1 / 3}, batch_size=3),
        _record(20, success={"raw": 2 / 3, "dm": 1.0}, batch_size=3),
    ]
    s = summarize(records)
    assert s.audits == 2 and (s.first_step, s.last_step) == (10, 20)
    assert s.success_rate["dm"] == pytest.approx(2 / 3)
    assert s.max_success_rate["raw"] == pytest.approx(2 / 3)
    assert s.recovered == {"raw": 2, "dm": 4}
    # identification 1/3 and 2/3 of 3 per audit: 1 + 1 raw, 2 + 2 dm
    assert s.identified == {"raw": 2, "clean": 4, "dm": 4}
    assert s.identification_chance == 2
    assert s.lone_found == 4 and s.lone_in_batch == 4
    assert s.detection_power == pytest.approx(0.97)


def test_checks_keep_their_worst_status_and_its_first_detail():
    fail = {"name": "noise_scale", "status": "fail", "detail": "too little noise"}
    records = [_record(10), _record(20, checks=[fail]), _record(30, checks=[fail])]
    s = summarize(records)
    c = s.checks["noise_scale"]
    assert (c.passed, c.warned, c.failed) == (0, 1, 2)
    assert c.status == "fail" and c.detail == "too little noise" and c.first_step == 20
    assert s.valid is False and s.failed_checks == ["noise_scale"]
    assert s.verdict.status == "invalid" and "noise_scale" in s.verdict.headline


def test_validity_is_unknown_when_any_audit_ran_no_check():
    assert summarize([_record(10), _record(20, checks=[])]).valid is None
    assert summarize([_record(10)]).valid is True


def test_a_summary_reads_back_from_report_json_with_its_verdict():
    s = summarize([_record(10), _record(20)])
    back = RunSummary.from_json(s.to_json(), s.verdict.to_json())
    assert back.to_json() == s.to_json()
    assert back.verdict == s.verdict
    # without the verdict's JSON it is worded anew from the numbers, the same way
    assert summary_from_json(s.to_json()).verdict == s.verdict
    assert RunSummary.from_json(s.to_json()).verdict is None


def test_no_records_gives_no_verdict_but_says_so():
    s = summarize([])
    assert s.audits == 0 and s.valid is None
    assert s.verdict.status == "no_audits"


def test_every_rule_has_a_known_status():
    assert {rule.status for rule in RULES} <= set(VERDICT_STATUSES)
