"""``dmaudit report`` on hostile or broken log dirs: one readable line per problem, never a
traceback; the comparison page never links to a URL scheme."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest

from opacus_dmaudit.cli import main
from opacus_dmaudit.sinks.report import build_comparison, build_report
from tests.test_record import V2


def _variant(change) -> dict:
    record = copy.deepcopy(V2)
    change(record)
    return record


MALFORMED = {
    "check status 'bogus'": lambda r: r["checks"][0].update(status="bogus"),
    "checks as a string": lambda r: r.update(checks="value_range"),
    "a check without name": lambda r: r["checks"][0].pop("name"),
    "summary as a list": lambda r: r.update(summary=[1, 2]),
    "batch_size as text": lambda r: r.update(batch_size="32"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_record_is_left_out_and_named(tmp_path, capsys, case):
    good = copy.deepcopy(V2) | {"step": 10}
    lines = [json.dumps(good), json.dumps(_variant(MALFORMED[case]))]
    (tmp_path / "audit.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [a["step"] for a in report["audits"]] == [10]
    assert len(report["unread_records"]) == 1 and "record 2" in report["unread_records"][0]
    assert (tmp_path / "report.html").is_file()


def test_a_huge_record_version_and_deep_nesting_are_one_line_each(tmp_path, capsys):
    text = json.dumps(V2).replace('"record_version": 2', '"record_version": 1e400')
    (tmp_path / "audit.jsonl").write_text(text + "\n")
    assert main(["report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["audits"] == [] and "record_version" in report["unread_records"][0]
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "audit.jsonl").write_text('{"step": 1, "x": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(SystemExit):
        main(["report", str(deep)])
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err


def test_a_one_dimensional_truth_array_still_gives_both_reports(tmp_path):
    (tmp_path / "audit.jsonl").write_text(json.dumps(V2) + "\n")
    (tmp_path / "images").mkdir()
    buf = io.BytesIO()
    np.savez_compressed(buf, truth=np.zeros(10, np.uint8), raw=np.zeros(10, np.uint8))
    (tmp_path / "images" / f"step_{V2['step']:08d}.npz").write_bytes(buf.getvalue())
    json_path, html_path = build_report(tmp_path)
    assert json.loads(json_path.read_text())["audits"][0]["step"] == V2["step"]
    assert "</html>" in html_path.read_text()


def test_a_run_named_like_a_url_scheme_is_linked_as_a_relative_path(tmp_path):
    run = tmp_path / "javascript:alert(1)"
    run.mkdir()
    (run / "audit.jsonl").write_text(json.dumps(V2) + "\n")
    build_report(run)
    page = build_comparison(tmp_path / "compare", [run]).read_text()
    hrefs = [part.split("'", 1)[0] for part in page.split("href='")[1:]]
    assert hrefs and all(h.startswith(("./", "../")) for h in hrefs)
    assert "href='javascript" not in page.lower()
