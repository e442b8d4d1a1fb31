"""The typed audit record: the JSON on disk unchanged, every earlier version read, bad input named."""

from __future__ import annotations

import json
import math

import pytest

from opacus_dmaudit.record import AuditRecord, RecordError
from opacus_dmaudit.sinks.audit_log import read_audit_log, read_json_lines
from opacus_dmaudit.sinks.report import build_report

#: A record as release 0.1 wrote it (version 2), with every group of fields.
V2 = {
    "record_version": 2,
    "step": 20,
    "mode": "imprint",
    "epsilon": 12.5,
    "epsilon_accountant": "rdp",
    "epsilon_note": None,
    "delta": 1e-5,
    "noise_multiplier": 0.05,
    "mu_step": 20.0,
    "max_grad_norm": 1.0,
    "sample_rate": 0.064,
    "clipping": "flat",
    "batch_size": 3,
    "num_bins": 128,
    "occupied_bins": 3,
    "true_singletons": 2,
    "found_singletons": 2,
    "collisions_flagged": 0,
    "detection": {"test": "row-fisher", "power": 0.97},
    "summary": {"lpips_raw": 0.3, "lpips_dm": 0.05},
    "success_criterion": {"metric": "lpips", "threshold": 0.1, "higher_is_better": False},
    "success": {"raw": 0.0, "clean": 0.6667, "dm": 0.3333},
    "identification": {"raw": 0.3333, "clean": 0.6667, "dm": 0.6667},
    "kappa": 0.05,
    "kappa_baseline": 0.05,
    "kappa_uniform": 0.001,
    "bounds": {"single_step": 1.0, "single_step_identification": 1.0},
    "run_bounds": {"rdp": 1.0, "profile": None, "clt_gdp_approx": 1.0},
    "privacy_measured": {"epsilon_lower": 2.0, "mu_step_ci": [1.0, 3.0]},
    "denoiser": {"prior": "embedded:mnist", "sampler": "ddim", "steps": 20, "min_stride": 20},
    "checks": [
        {"name": "value_range", "status": "pass", "detail": "all inputs in [0, 1]", "value": 0.0},
        {
            "name": "noise_scale",
            "status": "warn",
            "detail": "more noise",
            "value": 1.2,
            "ci": [1, 2],
        },
    ],
    "valid": True,
    "images": [
        {
            "bin": 4,
            "occupied": True,
            "zscore": 9.0,
            "collision": False,
            "noise_std": 0.2,
            "true_count": 1,
            "residual_std_raw": 0.2,
            "lpips_raw": 0.3,
            "lpips_dm": 0.05,
            "dm_faithful": True,
        },
        {
            "bin": 7,
            "occupied": True,
            "zscore": 5.0,
            "collision": False,
            "noise_std": 0.4,
            "true_count": 0,
        },
        {
            "bin": 9,
            "occupied": True,
            "zscore": 7.0,
            "collision": True,
            "noise_std": 0.3,
            "true_count": 2,
            "residual_std_raw": 0.3,
            "lpips_raw": 0.4,
            "lpips_dm": 0.2,
        },
    ],
    "missed": [{"bin": 11, "noise_std": 1.5}],
    "prior_fit": {"images": 2, "faithful_share": 0.5},
    "audit_seconds": 1.5,
}


def test_a_record_round_trips_to_the_same_json():
    record = AuditRecord.from_json(V2)
    assert record.to_json() == V2
    assert record.lone_in_batch == 2 and record.lone_found == 2
    assert record.mean("lpips", "dm") == 0.05
    assert record.success_criterion.text == "LPIPS ≤ 0.1"
    assert record.check("noise_scale").value == 1.2
    assert record.valid is True


def test_image_scores_are_paired_with_their_rows_in_the_image_file():
    record = AuditRecord.from_json(V2)
    # rows count only the images scored against a real sample (the file holds those)
    assert [im.row for im in record.images] == [0, None, 1]
    assert [im.bin for im in record.scored] == [4, 9]
    assert record.images[2].blend and not record.images[0].blend
    assert record.images[0].metric("lpips", "dm") == 0.05


def test_a_version_1_record_is_read_with_unknown_validity_and_split_bounds():
    v1 = {
        "step": 5,
        "epsilon": 3.0,
        "noise_multiplier": 1.0,
        "summary": {"ssim_raw": 0.2},
        "images": [{"bin": 1, "ssim_raw": 0.2}],
        "bounds": {"single_step": 0.1, "rdp": 0.2, "clt_gdp_approx": 0.3},
    }
    record = AuditRecord.from_json(v1)
    assert record.record_version == 1 and record.valid is None and record.mode == "imprint"
    assert record.bounds == {"single_step": 0.1}
    assert record.run_bounds == {"rdp": 0.2, "clt_gdp_approx": 0.3}
    assert record.images[0].row == 0


def test_an_audit_that_ran_no_check_is_not_called_valid():
    record = AuditRecord.from_json({**V2, "checks": []})
    assert record.valid is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": "3"}, "integer 'step'"),
        ({"batch_size": "32"}, "'batch_size' must be an integer"),
        ({"record_version": 1e400}, "'record_version' must be an integer"),
        ({"record_version": 9}, "record_version 9"),
        ({"checks": "all good"}, "'checks' must be a list"),
        ({"checks": [{"status": "pass", "detail": ""}]}, "needs a 'name'"),
        ({"checks": [{"name": "x", "status": "bogus", "detail": ""}]}, "status 'bogus'"),
        ({"summary": [1, 2]}, "'summary' must be an object"),
        ({"success": {"raw": "high"}}, "'raw' must be a number"),
        ({"images": [{"zscore": 1.0}]}, "needs its 'bin'"),
        ({"epsilon": "12"}, "'epsilon' must be a number"),
    ],
)
def test_a_malformed_record_is_refused_with_the_field_named(change, message):
    with pytest.raises(RecordError, match=message):
        AuditRecord.from_json({**V2, **change})


def test_infinity_and_nan_survive_the_log(tmp_path):
    record = AuditRecord.from_json({**V2, "epsilon": math.inf, "mu_step": math.nan})
    line = json.dumps(record.to_json(), allow_nan=True)
    back = AuditRecord.from_json(json.loads(line))
    assert back.epsilon == math.inf and back.mu_step is None  # NaN is written as null


def _write_log(folder, lines):
    folder.mkdir()
    (folder / "audit.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_dmaudit_report_reads_every_earlier_format_and_names_what_it_cannot(tmp_path):
    v1 = {"step": 5, "epsilon": 3.0, "noise_multiplier": 1.0, "images": [], "summary": {}}
    bad = {**V2, "step": 30, "checks": [{"name": "x", "status": "bogus", "detail": ""}]}
    deep = {"step": 40, "detection": json.loads("[" * 100 + "]" * 100)}
    _write_log(tmp_path / "run", [v1, V2, bad, deep])
    json_path, html_path = build_report(tmp_path / "run")
    report = json.loads(json_path.read_text())
    assert [a["step"] for a in report["audits"]] == [5, 20]
    assert report["audits"][1] == V2  # the record as it was written
    assert len(report["unread_records"]) == 2
    assert "bogus" in report["unread_records"][0]
    page = html_path.read_text()
    assert "could not be read" in page and "bogus" in page


def test_the_log_reader_raises_on_a_bad_record_unless_asked_to_collect(tmp_path):
    _write_log(tmp_path / "run", [V2, {**V2, "step": 30, "batch_size": "32"}])
    path = tmp_path / "run" / "audit.jsonl"
    assert len(read_json_lines(path)) == 2
    with pytest.raises(RecordError, match="record 2.*batch_size"):
        read_audit_log(path)
    problems: list[str] = []
    assert [r.step for r in read_audit_log(path, problems=problems)] == [20]
    assert len(problems) == 1
