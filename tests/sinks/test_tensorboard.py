"""TensorBoard events read back with TensorBoard's own reader; resume without duplicate audits."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from opacus_dmaudit import DMAuditor, read_audit_log
from opacus_dmaudit.privacy.packing import decode_floats
from opacus_dmaudit.sinks.summary import summarize
from tests.helpers import (
    audited_run,
    imprint_model,
    make_private,
    private_training,
    small_cnn,
    train_steps,
)


def _events(path):
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_every_tag_and_image_is_in_the_event_files(mnist5k, tmp_path):
    auditor, _ = audited_run(mnist5k, tmp_path, sigma=0.02, steps=2, prior="embedded:mnist")
    auditor.close()
    acc = _events(tmp_path)
    scalars = set(acc.Tags()["scalars"])
    expected = {"privacy/epsilon", "privacy/mu_step", "bounds/single_step", "run_bounds/rdp"}
    expected |= {f"checks/{name}/status" for name in ("value_range", "blind", "bins")}
    for stage in ("raw", "dm", "clean"):
        expected |= {f"quality/{stage}/{m}" for m in ("mse", "ssim", "lpips", "success_rate")}
    assert expected <= scalars, expected - scalars
    assert [e.step for e in acc.Scalars("privacy/epsilon")] == [1, 2]
    assert acc.Scalars("privacy/mu_step")[0].value == pytest.approx(50.0)
    # DM beats the raw readout at this noise level on the logged means
    assert acc.Scalars("quality/dm/lpips")[-1].value < acc.Scalars("quality/raw/lpips")[-1].value
    images = acc.Images("audit/reconstructions")
    assert [im.step for im in images] == [1, 2]
    found = auditor.history[-1].images
    n = min(16, sum("mse_raw" in im.metrics for im in found))
    # rows truth | raw | DM of 28x28 images with 2-pixel padding, one column per image
    assert (images[-1].height, images[-1].width) == (3 * 30 + 2, n * 30 + 2)
    tensors = set(acc.Tags()["tensors"])
    assert "custom_scalars__config__" in tensors
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    # a reader's text: the verdict of the run so far at each audit, the grid's caption
    verdicts = acc.Tensors("verdict/text_summary")
    assert [e.step for e in verdicts] == [1, 2]
    last = verdicts[-1].tensor_proto.string_val[0].decode()
    assert summarize(auditor.history).verdict.headline in last and "failed" in last.lower()
    caption = acc.Tensors("audit/reconstructions/text_summary")[-1].tensor_proto.string_val[0]
    caption = caption.decode()
    assert "rows truth | raw readout | DM" in caption
    assert caption.count("\n* ") == n and f"bin {found[0].bin}" in caption


def test_custom_layout_groups_privacy_quality_and_checks(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    from opacus_dmaudit.record import AuditRecord
    from opacus_dmaudit.sinks.tensorboard import TensorBoardSink

    sink = TensorBoardSink(log_dir=tmp_path)
    record = AuditRecord.from_json(
        {
            "step": 3,
            "epsilon": 1.5,
            "delta": 1e-5,
            "noise_multiplier": 1.0,
            # the membership test's ROC (issue 20's field): drawn as a curve
            "privacy_measured": {"roc_points": [[0, 0], [0.1, 0.4], [0.5, 0.8], [1, 1]]},
        }
    )
    sink.log_audit(record)
    sink.close()
    acc = _events(tmp_path)
    proto = acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles == ["dmaudit: privacy", "dmaudit: quality", "dmaudit: checks"]
    tags = {c.title: {t for ch in c.chart for t in ch.multiline.tag} for c in layout.category}
    assert "privacy/epsilon.*" in tags["dmaudit: privacy"]
    assert "checks/.*/status" in tags["dmaudit: checks"]
    assert any(t.startswith("quality/dm/") for t in tags["dmaudit: quality"])
    roc = acc.Images("privacy/membership_roc")
    assert [im.step for im in roc] == [3] and roc[0].width > 100
    assert "privacy/membership_roc/text_summary" in acc.Tags()["tensors"]


def test_infinite_epsilon_is_shown_not_a_crash(mnist5k, tmp_path):
    auditor, _ = audited_run(mnist5k, tmp_path, sigma=0.0, steps=1)
    auditor.close()
    assert auditor.history[0].epsilon == math.inf
    acc = _events(tmp_path)
    assert "privacy/epsilon/text_summary" in acc.Tags()["tensors"]  # ∞ has no chart point
    assert "quality/raw/mse" in acc.Tags()["scalars"]


def test_the_users_own_writer_gets_the_audit(mnist5k, tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path / "user_run"))
    writer.add_scalar("train/loss", 1.0, 0)
    auditor, _ = audited_run(mnist5k, tmp_path / "audit", sigma=0.02, steps=1, writer=writer)
    auditor.close()
    writer.add_scalar("train/loss", 0.5, 1)  # still open: the auditor does not close it
    writer.close()
    tags = set(_events(tmp_path / "user_run").Tags()["scalars"])
    assert {"train/loss", "privacy/epsilon", "quality/raw/mse"} <= tags
    # the image grids go to the auditor's own private event file, never to the user's run
    assert not _events(tmp_path / "user_run").Tags()["images"]
    assert "audit/reconstructions" in _events(tmp_path / "audit").Tags()["images"]


def test_resume_continues_the_log_without_duplicates_or_gaps(mnist5k, tmp_path):
    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    model, opt, loader, engine = make_private(model, x, y, sigma=0.02)
    auditor = DMAuditor(
        privacy_engine=engine, log_dir=tmp_path, every_n_steps=2, metrics=("mse",)
    ).attach(opt)
    saved = {}

    def after(i):
        if i == 4:  # checkpoint at step 4
            saved["auditor"] = auditor.state_dict()
            saved["model"] = {k: v.clone() for k, v in model.state_dict().items()}
            saved["accountant"] = list(engine.accountant.history)

    train_steps(model, opt, loader, 7, after_step=after)  # audits 2, 4, 6, then a "crash"
    auditor.detach()
    assert [r.step for r in read_audit_log(tmp_path / "audit.jsonl")] == [2, 4, 6]
    assert saved["auditor"]["step"] == 4 and saved["auditor"]["last_audit_step"] == 4

    # a new process restores the step-4 checkpoint and trains on to step 10
    model2 = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    model2, opt2, loader2, engine2 = make_private(model2, x, y, sigma=0.02)
    model2.load_state_dict(saved["model"])
    engine2.accountant.history = list(saved["accountant"])
    resumed = DMAuditor(privacy_engine=engine2, log_dir=tmp_path, every_n_steps=2, metrics=("mse",))
    resumed.load_state_dict(saved["auditor"])
    state = json.loads(json.dumps(saved["auditor"]))  # checkpoints may hold it as JSON
    assert torch.equal(resumed.generator.get_state(), torch.tensor(state["generator"]).byte())
    resumed.attach(opt2)
    assert [r.step for r in resumed.history] == [2, 4]
    train_steps(model2, opt2, loader2, 6)
    resumed.close()
    steps = [r.step for r in read_audit_log(tmp_path / "audit.jsonl")]
    assert steps == [2, 4, 6, 8, 10]
    assert [r.step for r in resumed.history] == [2, 4, 6, 8, 10]
    # the pooled membership evidence continues across the resume: the last audit pools the
    # member scores of every audit the log keeps, those before the checkpoint included
    kept = read_audit_log(tmp_path / "audit.jsonl")
    members = [decode_floats(r.evidence["membership"]["member"]).size for r in kept]
    assert all(members) and resumed.history[-1].privacy_measured["trials_member"] == sum(members)
    # TensorBoard holds each audit once: the crashed run's step-6 audit is purged on resume
    assert [e.step for e in _events(tmp_path).Scalars("quality/raw/mse")] == [2, 4, 6, 8, 10]


def test_the_measured_epsilon_is_charted_beside_the_accountants(mnist5k, tmp_path):
    """``privacy/epsilon_measured`` (and its interval) next to ``privacy/epsilon``, per audit."""
    x, y = mnist5k["private"]
    p = private_training(small_cnn(), x, y, sigma=1.0)
    auditor = DMAuditor(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=2,
                        metrics=("mse",), report=False, save_images=False)  # fmt: skip
    auditor.attach(p.optimizer, model=p.model)
    train_steps(p.model, p.optimizer, p.loader, 4, criterion=p.criterion)
    auditor.close()
    acc = _events(tmp_path)
    for tag in ("privacy/epsilon", "privacy/epsilon_measured"):
        assert [e.step for e in acc.Scalars(tag)] == [2, 4], tag
    for record, low, mid, high in zip(
        auditor.history,
        acc.Scalars("privacy/epsilon_measured_low"),
        acc.Scalars("privacy/epsilon_measured"),
        acc.Scalars("privacy/epsilon_measured_high"),
    ):
        assert mid.value == pytest.approx(record.epsilon_measured, rel=1e-6)
        assert [low.value, high.value] == pytest.approx(record.epsilon_measured_ci, rel=1e-6)
        assert low.value <= record.epsilon <= high.value  # a correct run


def test_the_membership_roc_is_drawn_beside_the_gaussian_tradeoff(mnist5k, tmp_path):
    """A live audit pools member and non-member scores: the record keeps the ROC's corners, the
    auditor's own event file gets the curve as an image, and the report draws it against the
    Gaussian trade-off at µ = 1/σ and at the measured µ."""
    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=128)
    model, opt, loader, engine = make_private(model, x, y, sigma=0.5)
    auditor = DMAuditor(privacy_engine=engine, log_dir=tmp_path, every_n_steps=2,
                        metrics=("mse",)).attach(opt)  # fmt: skip
    train_steps(model, opt, loader, 4)
    auditor.close()
    roc = auditor.history[-1].privacy_measured["roc_points"]
    assert roc["fpr"][0] == roc["tpr"][0] == 0.0 and roc["fpr"][-1] == roc["tpr"][-1] == 1.0
    assert all(a <= b for a, b in zip(roc["fpr"], roc["fpr"][1:])) and len(roc["fpr"]) <= 66
    acc = _events(tmp_path)
    assert [e.step for e in acc.Images("privacy/membership_roc")] == [2, 4]
    assert (
        "Membership test: ROC against the Gaussian trade-off"
        in (tmp_path / "report.html").read_text()
    )
