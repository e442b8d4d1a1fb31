"""Quick modes of the benchmark scripts: they run end to end on the real data and say sane things."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd,
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
    out = _run("bounds_vs_empirical.py")
    rows = [line.split() for line in out.splitlines() if line.startswith(("mnist ", "cifar10 "))]
    assert len(rows) == 8  # 2 data sets x 2 noise levels x 2 success thresholds
    for row in rows:
        raw, dm, bound = float(row[5]), float(row[6]), float(row[9])
        assert 0 <= raw <= 1 and 0 <= dm <= 1 and 0 < bound <= 1


@pytest.mark.slow
def test_overhead_quick():
    out = _run("overhead.py", "--rounds", "1", "--steps", "30")
    rows = {
        line[:18].strip(): line[18:].split()
        for line in out.splitlines()
        if line.startswith(("plain", "capture", "audit", "+ prior"))
    }
    assert len(rows) == 9, out
    assert rows["plain Opacus"][1:] == ["1.000x", "1.000x", "1.000x"]
    for name in ("plain again (A/A)", "capture only", "audit every 10", "+ prior every 50"):
        ms, wall, cpu, steady = rows[name]
        assert float(ms) > 0 and all(float(v.rstrip("x")) > 0 for v in (wall, cpu, steady))
    assert "targets: capture only" in out
