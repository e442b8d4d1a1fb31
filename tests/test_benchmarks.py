"""Quick modes of the benchmark scripts: they run end to end on the real data and say sane things."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def _run(script: str, *args: str, cwd: Path = REPO) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=cwd,
        # the checkout's package, whichever one is installed (a script's own folder is on its path)
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quality_vs_noise_quick(tmp_path, shared_data):
    out = _run("quality_vs_noise.py", "--out", str(tmp_path))
    assert "ε 1 step" in out and "classical (tv)" in out
    results = json.loads((tmp_path / "quality_vs_noise_quick.json").read_text())
    assert {r["dataset"] for r in results} == {"mnist", "cifar10"}
    for r in results:
        lp = {k: sum(v["lpips"]) / len(v["lpips"]) for k, v in r["scores"].items()}
        assert r["singletons"] >= 20
        assert lp["ddim-20"] < lp["raw"]  # the prior helps at the quick mode's noise level
        assert r["mu"] == pytest.approx(1 / r["sigma"])
    assert (tmp_path / "quality_vs_noise_quick.png").is_file()


@pytest.mark.slow
def test_prior_mismatch_and_bounds_quick(shared_data):
    out = _run("prior_mismatch.py")
    assert "gap, out-of-domain minus in-domain" in out
    assert out.count("natural prior") >= 2 and out.count("mnist prior") >= 2
    assert "natural prior, grey input" in out  # CIFAR-10's in-domain control on grey input
    out = _run("bounds_vs_empirical.py")
    assert "RATE ABOVE BOUND" not in out  # κ at the same criterion: the bound holds on real data
    rows = [
        [part.split() for part in line.split("|")]
        for line in out.splitlines()
        if line.startswith(("mnist ", "cifar10 "))
    ]
    assert len(rows) == 3  # 2 MNIST + 1 CIFAR-10 noise levels
    for head, criterion, identification in rows:  # data σ µ lone found | ... | ...
        raw, dm, audit, bound = (float(v) for v in criterion[:4])
        assert 0 <= audit <= dm <= 1 and 0 <= raw <= 1 and 0 < bound <= 1
        iraw, idm, iaudit, ibound = (float(v) for v in identification)
        assert 0 <= iaudit <= idm <= 1 and 0 <= iraw <= 1 and 0 < ibound <= 1
        if head[:2] == ["mnist", "0.03"]:
            assert idm >= iraw > 0.5  # the prior helps; digits are identifiable at µ = 33


@pytest.mark.slow
def test_overhead_quick():
    out = _run("overhead.py")  # 6 configurations, 1 round of 10 steps at batch 64
    rows = {
        line[:22].strip(): line[22:].split()
        for line in out.splitlines()
        if line.startswith(("plain", "capture", "audit", "+ prior"))
    }
    assert set(rows) == {
        "plain Opacus",
        "plain again (A/A)",
        "capture only",
        "audit every 10",
        "+ prior every 10",
        "+ prior every 10 (bg)",
    }, out
    assert rows["plain Opacus"][1:] == ["1.000x", "1.000x", "1.000x", "0", "-", "-"]
    for name, (ms, wall, cpu, steady, audits, fit, _attach) in rows.items():
        assert float(ms) > 0 and all(float(v.rstrip("x")) > 0 for v in (wall, cpu, steady))
        # the audit at the last step is written, the background one drained by close()
        expected = {"audit every 10": 1, "+ prior every 10": 1, "+ prior every 10 (bg)": 1}
        assert int(audits) == expected.get(name, 0), (name, out)
        assert fit.endswith("%") == name.startswith("+ prior"), (name, out)
    assert "targets: capture only" in out and "hardware: device cpu" in out
    # the per-audit breakdown by stage (seconds per audit), the prior's row spends time in it
    stages = out.split("per-audit cost by stage")[1].splitlines()
    header = stages[1].split()
    row = next(line for line in stages if line.startswith("  + prior every 10 "))
    values = row[24:].split()
    assert float(values[header.index("prior") - 1]) > 0 and values[-2].endswith("%"), out


@pytest.mark.slow
def test_detection_quick(tmp_path, shared_data):
    out = _run("detection.py", "--out", str(tmp_path))
    assert "target mnist σ = 0.05" in out and "target cifar10 σ = 0.03" in out
    results = json.loads((tmp_path / "detection_quick.json").read_text())
    assert {r["dataset"] for r in results} == {"mnist", "cifar10"}
    for r in results:
        found = r["found"]
        assert r["lone"] >= 50 and all(0 <= v <= 1 for v in found.values())
        assert found["oracle"] >= found["auditor"] - 0.05  # nothing beats the oracle
        assert found["auditor"] >= found["old"]
        assert abs(found["auditor"] - r["power_pred"]) < 0.15  # predicted power is right
        assert r["false_bins"] <= 2
        target = {"mnist": 0.05, "cifar10": 0.03}[r["dataset"]]
        if r["sigma"] == target:  # the targets, through the auditor's score_step
            assert found["auditor"] >= 0.5


@pytest.mark.slow
def test_utility_quick(shared_data):
    out = _run("utility.py")
    rows = [line.split() for line in out.splitlines() if line.startswith(("mnist ", "cifar10 "))]
    assert [(row[0], row[1]) for row in rows] == [
        (name, config) for name in ("mnist", "cifar10") for config in ("no", *["block,"] * 3)
    ]  # no block, then α = 1, 10, 100, per data set
    assert out.count("  run ") == 8  # one line per run (one seed in quick mode)
    for name in ("mnist", "cifar10"):
        table = [row for row in rows if row[0] == name]
        assert table[0][-4] == "-" and len({row[-3] for row in table}) == 1  # one ε per data set
        assert float(table[0][-3]) > 0
        for row in table:
            accuracy = float(row[3] if row[1] == "no" else row[5])
            assert 0.0 <= accuracy <= 1.0
        shares = [float(row[-4]) for row in table[1:]]
        # the imprint's share of the per-sample gradient grows with α; at α = 100 it is most of it
        assert 0 <= shares[0] < shares[1] < shares[2] <= 1 and shares[2] > 0.5, shares


@pytest.mark.slow
def test_run_epsilon_quick(tmp_path, shared_data):
    """The run's ε measured on real Opacus runs: a correct run agrees with the accountant, each
    injected bug is outside the interval and fails its check."""
    out = _run("run_epsilon.py", "--out", str(tmp_path))
    assert "| data | target ε | injected bug |" in out
    targets = [line for line in out.splitlines() if line.startswith("* ")]
    assert len(targets) == 3 and all("-> met" in line for line in targets), targets
    rows = json.loads((tmp_path / "run_epsilon_quick.json").read_text())
    correct = [r for r in rows if r["bug"] is None]
    assert len(correct) == 1 and len(rows) == 3
    for r in correct:
        assert 0.95 <= r["measured"] / r["claimed"] <= 1.05 and r["inside"]
        assert r["checks"] == [] and 0.5 <= r["attack"] / r["claimed"] <= 1.2
    for r, check in zip(rows[1:], ("noise_scale fail", "sampling fail")):
        assert not r["inside"] and r["ci"][0] > r["claimed"] and check in r["checks"], r


def test_batch_size_quick_reads_half_a_batch_of_512(tmp_path, shared_data):
    """The sized shadow adversary reads ≥ 50 % of a batch of 512 at σ = 0.002; 128 bins do not."""
    out = _run("batch_size.py", "--batches", "512", "--out", str(tmp_path / "b.json"))
    assert "target (sized K, B = 512, σ = 0.002, exposure ≥ 50 %): met" in out
    rows = {r["limited_by"] == "fixed": r for r in json.loads((tmp_path / "b.json").read_text())}
    fixed, sized = rows[True], rows[False]
    assert fixed["K"] == 128 and sized["K"] > 10 * 128 and sized["alone"] > 0.8
    assert sized["exposure"] >= 0.5 > 0.1 > fixed["exposure"]
    assert sized["per_target"] > 0.9  # at σ = 0.002 every lone digit is read to LPIPS ≤ 0.1


@pytest.mark.slow
def test_batch_size_on_photos_reads_half_a_batch_of_512_with_the_prior(tmp_path, shared_data):
    """CIFAR-10 at B = 512, σ = 0.002: the raw readout of a lone photo rarely meets LPIPS ≤ 0.1,
    the embedded prior's reconstruction mostly does, and the sized adversary reads half the
    batch with it (the natural patches' duplicates cost it no bins)."""
    out = _run(
        "batch_size.py", "--datasets", "cifar10", "--batches", "512", "--prior",
        "--out", str(tmp_path / "b.json"),
    )  # fmt: skip
    assert "target (sized K, B = 512, σ = 0.002, exposure ≥ 50 %): met" in out
    sized = [r for r in json.loads((tmp_path / "b.json").read_text()) if r["K"] > 128]
    (cell,) = sized
    assert cell["K"] > 3000 and cell["exposure"] < 0.25 <= 0.5 <= cell["dm_exposure"]


@pytest.mark.slow
def test_verdict_holdout_quick_has_no_violation(tmp_path, shared_data):
    """Quick hold-out: no negative verdict where a per-target count beats its baseline."""
    out = _run("verdict_holdout.py", "--out", str(tmp_path / "v.json"))
    rows = json.loads((tmp_path / "v.json").read_text())
    assert {r["mode"] for r in rows} == {"shadow"} and "0 violations" in out
    for r in rows:
        assert r["targets"] > 0 and not r["violation"]
        if r["p_min"] < 1e-3:  # σ = 0.05 at B = 32: digits are read and identified
            assert r["verdict"] == "leakage", r["headline"]
