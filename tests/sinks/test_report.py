"""The report: built from a killed run's log, escaped, private, and rendered by a real browser."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from opacus_dmaudit.sinks.report.build import build_report, load_audit_images
from tests.helpers import REPO, audited_run

TRAINING_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {repo!r})
    from tests.helpers import imprint_model, make_private
    from opacus_dmaudit import DMAuditor
    from opacus_dmaudit.assets.data import mnist_5k_split

    split = mnist_5k_split()
    x, y = split["private"]
    model = imprint_model(split["prior"][0][:1000], num_bins=128)
    model, opt, loader, engine = make_private(model, x, y, sigma=0.01)
    auditor = DMAuditor(privacy_engine=engine, log_dir={log_dir!r}, every_n_steps=1,
                        metrics=("mse", "ssim", "lpips"), prior="embedded:mnist").attach(opt)
    step = 0
    while True:
        for xb, yb in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            print("audited", step, flush=True)
    """
)


def test_report_from_a_killed_training_process(tmp_path):
    log_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(TRAINING_SCRIPT.format(repo=str(REPO), log_dir=str(log_dir)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in proc.stdout:
            if line.strip() == "audited 3":
                break
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup, no close(): a crash
        proc.wait()
    assert not (log_dir / "report.html").exists()
    with open(log_dir / "audit.jsonl", "a") as f:
        f.write('{"step": 4, "epsilon": 1.0, "ima')  # what a kill mid-write leaves
    result = subprocess.run(
        [sys.executable, "-m", "opacus_dmaudit.cli", "report", str(log_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "report.html" in result.stdout
    report = json.loads((log_dir / "report.json").read_text())
    assert [a["step"] for a in report["audits"]][:3] == [1, 2, 3]
    assert report["summary"]["final_epsilon"] > 0
    assert report["config"]["prior"] == "embedded:mnist"
    assert "opacus" in report["versions"]
    html = (log_dir / "report.html").read_text()
    assert "private training data" in html and "data:image/png;base64," in html
    for name in ("report.json", "report.html", "audit.jsonl", "run.json"):
        assert stat.S_IMODE(os.stat(log_dir / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(log_dir).st_mode) == 0o700


def test_close_writes_the_report_with_bounds_and_images(mnist5k, tmp_path):
    auditor, _ = audited_run(
        mnist5k,
        tmp_path,
        sigma=0.02,
        steps=2,
        metrics=("mse", "lpips"),
        prior="embedded:mnist",
        kappa=1 / 5000,
    )
    auditor.close()
    record = auditor.history[-1]
    assert record.kappa == 1 / 5000
    # the audited step's own event (at σ, for identification, and at a measured µ when known)
    own_step = {"single_step", "single_step_identification", "estimate_at_measured_mu"}
    assert {"single_step", "single_step_identification"} <= set(record.bounds) <= own_step
    assert set(record.run_bounds) == {"rdp", "profile", "clt_gdp_approx"}  # the whole run
    assert 0 < record.kappa_baseline < 1  # κ̂ from the calibration's public digits
    assert set(record.identification) == {"raw", "clean", "dm"}
    assert record.bounds["single_step"] == pytest.approx(1.0, abs=1e-6)  # µ = 50
    assert 0 < record.success["dm"] <= 1 and record.success["clean"] > 0
    images = load_audit_images(tmp_path / "images" / "step_00000002.npz")
    n = sum("mse_raw" in im.metrics for im in record.images)
    assert images["truth"].shape == images["dm"].shape == (n, 1, 28, 28)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["audits"] == 2
    html = (tmp_path / "report.html").read_text()
    assert "Best and worst" in html
    # the key numbers say they are shares of the batch (the verdict below counts targets)
    assert "of the batch reconstructed (dm)" in html and "of the batch identified (dm)" in html


def test_strings_from_the_data_are_escaped(tmp_path):
    os.makedirs(tmp_path, exist_ok=True)
    evil = "<script>alert(1)</script>"
    record = {
        "step": 1,
        "epsilon": 2.0,
        "delta": 1e-5,
        "noise_multiplier": 1.0,
        "summary": {},
        "images": [],
        "success_criterion": {"metric": evil, "threshold": 0.1},
    }
    (tmp_path / "audit.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "run.json").write_text(json.dumps({"config": {"prior": evil}, "versions": {}}))
    _, html_path = build_report(tmp_path)
    html = html_path.read_text()
    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_of_a_dir_without_a_log_is_a_clear_error(tmp_path, capsys):
    from opacus_dmaudit.cli import main

    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert "no audit.jsonl" in capsys.readouterr().err


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium for the report rendering test")
    pytest.skip("no Chromium here (apt-get install chromium)")


def test_report_renders_in_headless_chromium_with_no_broken_image(mnist5k, tmp_path):
    browser = _chromium()
    auditor, _ = audited_run(
        mnist5k, tmp_path / "run", sigma=0.02, steps=2, metrics=("lpips",), prior="embedded:mnist"
    )
    auditor.close()
    html = (tmp_path / "run" / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing external to fetch
    # the test (not the report) adds a probe that records how every image decoded
    probe = (
        "<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
        "document.body.setAttribute('data-images',imgs.length);"
        "document.body.setAttribute('data-broken',"
        "imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length);});</script></body>"
    )
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe))
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-broken="0"' in out
    count = int(out.split('data-images="')[1].split('"')[0])
    assert count >= 4  # plots and the best/worst grids
