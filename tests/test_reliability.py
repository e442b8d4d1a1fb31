"""Artefacts that survive misuse: folders, permissions, reused log dirs, torn files, bad input."""

import json
import logging
import os
import stat
import subprocess
import sys
import time

import pytest

from opacus_dmaudit import DMAuditor, read_audit_log
from opacus_dmaudit.cli import main
from opacus_dmaudit.errors import LogDirInUse
from opacus_dmaudit.sinks.logdir import LogDir
from opacus_dmaudit.sinks.report.build import build_report
from tests.helpers import audited_run, imprint_model, make_private, train_steps

FAST = {"metrics": ("mse",), "tensorboard": False}


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_an_existing_shared_folder_keeps_its_mode_and_is_warned_about(mnist5k, tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # a world-writable sticky folder like /tmp
    with caplog.at_level(logging.WARNING, logger="opacus_dmaudit.sinks.logdir"):
        auditor, _ = audited_run(mnist5k, shared, sigma=0.01, steps=2, every=2, **FAST)
        auditor.close()
    assert _mode(shared) == 0o1777  # never chmod-ed
    assert "accessible to other users" in caplog.text
    for name in ("audit.jsonl", "run.json", "report.json", "report.html"):
        assert _mode(shared / name) == 0o600, name
    build_report(shared)  # `dmaudit report` on it keeps the mode too
    assert _mode(shared / "report.html") == 0o600 and _mode(shared) == 0o1777


def test_a_read_only_folder_is_not_made_writable(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        if os.access(folder, os.W_OK):  # root writes anyway: the mode must still not change
            LogDir(folder).prepare()
        else:
            with pytest.raises(PermissionError, match="cannot write into"):
                LogDir(folder).prepare()
        assert _mode(folder) == 0o555
    finally:
        os.chmod(folder, 0o755)


def test_new_folders_are_private_and_the_current_folder_is_left_alone(tmp_path, monkeypatch):
    os.chmod(tmp_path, 0o755)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", ".", "--steps", "2", "--every", "2",
                 "--noise-multipliers", "0.5", "--prior", "none", "--quiet"]) == 0  # fmt: skip
    assert _mode(tmp_path) == 0o755
    assert _mode(tmp_path / "sigma_0.5") == 0o700
    assert _mode(tmp_path / "comparison.html") == 0o600


def test_a_new_run_into_a_used_log_dir_is_refused_and_nothing_mixes(mnist5k, tmp_path):
    auditor, _ = audited_run(mnist5k, tmp_path, sigma=0.01, steps=2, every=1, **FAST)
    auditor.close()
    before = (tmp_path / "audit.jsonl").read_bytes()
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    model, opt, loader, engine = make_private(model, *mnist5k["private"], sigma=0.01)
    second = DMAuditor(privacy_engine=engine, log_dir=tmp_path, **FAST)
    with pytest.raises(LogDirInUse, match="already holds an audit"):
        second.attach(opt)
    assert (tmp_path / "audit.jsonl").read_bytes() == before
    assert opt.step_hook is not None and getattr(opt, "_dmaudit_capture", None) is None
    # the explicit way to replace it
    third = DMAuditor(
        privacy_engine=engine, log_dir=tmp_path, every_n_steps=1, existing="overwrite", **FAST
    )
    third.attach(opt)
    train_steps(model, opt, loader, 1)
    third.close()
    assert [r.step for r in read_audit_log(tmp_path / "audit.jsonl")] == [1]


def test_the_demo_run_twice_replaces_its_runs(tmp_path):
    args = ["demo", "--out", str(tmp_path), "--steps", "4", "--every", "2",
            "--noise-multipliers", "0.5", "--prior", "none", "--quiet"]  # fmt: skip
    assert main(args) == 0 and main(args) == 0
    steps = [r.step for r in read_audit_log(tmp_path / "sigma_0.5" / "audit.jsonl")]
    assert steps == [2, 4]
    report = json.loads((tmp_path / "sigma_0.5" / "report.json").read_text())
    assert report["summary"]["audits"] == 2


def test_a_failed_attach_leaves_no_files(mnist5k, tmp_path):
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    model, opt, loader, engine = make_private(model, *mnist5k["private"], sigma=0.01)
    first = DMAuditor(privacy_engine=engine, log_dir=tmp_path / "a", **FAST).attach(opt)
    second = DMAuditor(privacy_engine=engine, log_dir=tmp_path / "b", **FAST)
    with pytest.raises(RuntimeError, match="another auditor"):
        second.attach(opt)
    assert not (tmp_path / "b").exists()
    first.close()


def test_existing_readable_log_files_are_tightened(mnist5k, tmp_path):
    auditor, _ = audited_run(mnist5k, tmp_path, sigma=0.01, steps=2, every=2, **FAST)
    state = auditor.state_dict()
    auditor.close()
    for name in ("audit.jsonl", "run.json"):
        os.chmod(tmp_path / name, 0o644)
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    model, opt, loader, engine = make_private(model, *mnist5k["private"], sigma=0.01)
    resumed = DMAuditor(privacy_engine=engine, log_dir=tmp_path, **FAST)
    resumed.load_state_dict(state)
    resumed.attach(opt)
    assert _mode(tmp_path / "audit.jsonl") == 0o600 and _mode(tmp_path / "run.json") == 0o600
    resumed.close()


def test_run_file_records_the_accountant_and_the_lpips_backbone(mnist5k, tmp_path):
    auditor, _ = audited_run(
        mnist5k, tmp_path, sigma=0.01, steps=1, every=1, metrics=("lpips",), lpips_net="alex"
    )
    auditor.close()
    config = json.loads((tmp_path / "run.json").read_text())["config"]
    assert config["accountant"] == "RDPAccountant"
    assert config["lpips_net"] == "alex"


def test_a_torn_image_file_is_skipped_by_the_report(mnist5k, tmp_path):
    auditor, _ = audited_run(mnist5k, tmp_path, sigma=0.01, steps=2, every=1, **FAST)
    auditor.close()
    torn = tmp_path / "images" / "step_00000002.npz"
    torn.write_bytes(torn.read_bytes()[:100])  # what a kill mid-write would have left
    _, html_path = build_report(tmp_path)
    assert "Unreadable image files were left out (steps 2)" in html_path.read_text()


def test_images_are_written_before_their_log_line(mnist5k, tmp_path):
    """Each record's image file exists, whole, by the time the line is in the log."""
    seen = []

    def check(i):
        for record in read_audit_log(tmp_path / "audit.jsonl"):
            path = tmp_path / "images" / f"step_{record.step:08d}.npz"
            seen.append(path.is_file())

    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    model, opt, loader, engine = make_private(model, *mnist5k["private"], sigma=0.01)
    auditor = DMAuditor(privacy_engine=engine, log_dir=tmp_path, every_n_steps=1, **FAST)
    auditor.attach(opt)
    train_steps(model, opt, loader, 2, after_step=check)
    auditor.close()
    assert seen and all(seen)
    assert not list((tmp_path / "images").glob(".*.tmp"))  # no temporary file left behind


def test_a_mistyped_local_prior_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "priors").mkdir()
    for name in ("./my-prior", "priors/mnits", str(tmp_path / "nope"), "a/b/c"):
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="no such directory"):
            DMAuditor(log_dir=tmp_path / "run", prior=name, **FAST)
        assert time.perf_counter() - start < 5  # no Hub retries (a bound, not a timing claim)
    assert not (tmp_path / "run").exists()


def test_misspelt_settings_fail_at_construction():
    with pytest.raises(TypeError, match="did you mean 'every_n_steps'"):
        DMAuditor(log_dir="unused", every_n_step=5)
    from opacus_dmaudit.integrations.lightning import DMAuditCallback

    with pytest.raises(TypeError, match="DMAuditCallback.*did you mean 'every_n_steps'"):
        DMAuditCallback(every_n_step=5)
    with pytest.raises(ValueError, match="every_n_steps"):
        DMAuditCallback(every_n_steps=0)
    from opacus_dmaudit.integrations.huggingface import DMAuditTrainerCallback

    with pytest.raises(TypeError, match="DMAuditTrainerCallback.*'sampler'"):
        DMAuditTrainerCallback(samplr="ddim")


@pytest.mark.parametrize(
    "content,message",
    [
        ("[1, 2]\n", "line 1 is not a JSON object"),
        ('{"epsilon": 1}\n', "line 1 has no integer 'step'"),
        ("not json\n{also not}\n", "line 1 is not valid JSON"),
    ],
)
def test_a_file_that_is_no_audit_log_gives_a_one_line_error(tmp_path, capsys, content, message):
    (tmp_path / "audit.jsonl").write_text(content)
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"step": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
        ('{"step": 1}\nnot json\n{"step": 2}\n', "line 2 is not valid JSON"),
        ('{"step": 1}\n{"step": 5, garbage\n', "line 2 is not valid JSON"),
        ('{"step": 1}\n{"step": 2, "eps', "line 2 was cut off"),
    ],
)
def test_a_bad_line_in_a_log_is_left_out_and_named_the_rest_reported(
    tmp_path, capsys, content, message
):
    """One broken line must not cost the report the audits around it."""
    (tmp_path / "audit.jsonl").write_text(content)
    assert main(["report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["audits"] and any(message in p for p in report["unread_records"])
    assert message in (tmp_path / "report.html").read_text()


def test_a_bad_run_file_does_not_stop_the_report(tmp_path):
    (tmp_path / "audit.jsonl").write_text('{"step": 1, "images": []}\n')
    (tmp_path / "run.json").write_text("{not json")
    _, html_path = build_report(tmp_path)
    assert "No checks were recorded" in html_path.read_text()


def test_a_version_1_log_still_makes_a_report_without_claiming_validity(tmp_path):
    record = {"step": 5, "epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 1.0, "images": [],
              "summary": {}, "success": {"raw": 0.0}, "bounds": {"single_step": 0.02, "rdp": 0.5},
              "found_singletons": 0, "true_singletons": 40}  # fmt: skip
    (tmp_path / "audit.jsonl").write_text(json.dumps(record) + "\n")
    json_path, _ = build_report(tmp_path)
    report = json.loads(json_path.read_text())
    assert report["valid"] is None
    assert report["audits"][0]["run_bounds"] == {"rdp": 0.5}
    assert report["verdict"]["status"] == "undetectable"  # no power known: no negative claim


def test_demo_arguments_are_validated_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path), "--noise-multipliers", "0.5", "-1", "--quiet"])
    assert "must be a finite number >= 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path), "--prior", "./missing-prior", "--quiet"])
    assert "no such directory" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_version_and_help_show_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("dmaudit ")
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: 60)" in capsys.readouterr().out


def test_the_demo_prints_no_unexplained_warning(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [sys.executable, "-m", "opacus_dmaudit.cli", "demo", "--out", str(tmp_path),
         "--steps", "4", "--every", "2", "--noise-multipliers", "0.01", "1", "--quiet"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr
    assert proc.stderr.count("secure_mode=True") == 1  # the one that matters, explained once


def test_with_a_users_writer_images_go_to_a_private_file_and_the_users_is_untouched(
    mnist5k, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "user"))
    user_files = list((tmp_path / "user").glob("events.out.tfevents.*"))
    modes = {p: _mode(p) for p in user_files}
    auditor, _ = audited_run(
        mnist5k, tmp_path / "audit", sigma=0.01, steps=1, metrics=("mse",), writer=writer
    )
    auditor.close()
    writer.close()
    assert {p: _mode(p) for p in user_files} == modes  # never chmod-ed: not the auditor's
    user = EventAccumulator(str(tmp_path / "user"), size_guidance={"images": 0})
    user.Reload()
    assert "privacy/epsilon" in user.Tags()["scalars"] and not user.Tags()["images"]
    own = list((tmp_path / "audit").glob("events.out.tfevents.*"))
    assert own and all(_mode(p) == 0o600 for p in own)
    audit = EventAccumulator(str(tmp_path / "audit"), size_guidance={"images": 0})
    audit.Reload()
    assert "audit/reconstructions" in audit.Tags()["images"]  # and the membership ROC


def test_the_report_shows_why_when_nothing_is_recovered(mnist5k, tmp_path):
    auditor, _ = audited_run(mnist5k, tmp_path, sigma=1.0, steps=1, every=1, **FAST)
    auditor.close()
    record = auditor.history[-1]
    assert record.counts.lone_found == 0 and record.missed
    html = (tmp_path / "report.html").read_text()
    assert "Lone images the attack did not detect" in html


def test_report_grids_are_captioned(mnist5k, tmp_path):
    auditor, _ = audited_run(mnist5k, tmp_path, sigma=0.005, steps=1, every=1, **FAST)
    auditor.close()
    from opacus_dmaudit.sinks.logdir import LogDir as _LogDir
    from opacus_dmaudit.sinks.report.images import caption as image_caption

    record = auditor.history[-1]
    image = next(im for im in record.images if "mse_raw" in im.metrics)
    caption = image_caption(record.step, image, "mse")
    assert f"bin {image.bin}" in caption and "raw MSE" in caption
    assert _LogDir(tmp_path).load_images(1)["truth"].shape[0] > 0
    assert "Best and worst reconstructions (by MSE (raw))" in (tmp_path / "report.html").read_text()


def test_demo_table_and_comparison_page_agree(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "4", "--every", "2",
                 "--noise-multipliers", "0.005", "--prior", "none", "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "sigma_0.005" / "report.json").read_text())
    s = report["summary"]
    pair = f"{s['found_singletons']}/{s['true_singletons']}"
    assert pair in out and pair in (tmp_path / "comparison.html").read_text()
    assert report["verdict"]["text"] in out
    # the measured ε column: the run's ε re-accounted, from the run's own log
    from opacus_dmaudit.sinks.text import fmt

    measured = read_audit_log(tmp_path / "sigma_0.005" / "audit.jsonl")[-1].epsilon_measured
    assert measured is not None
    row = next(line for line in out.splitlines() if line.strip().startswith("0.005"))
    assert fmt(measured) in row.split()
