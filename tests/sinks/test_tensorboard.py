"""TensorBoard events read back with TensorBoard's own reader; resume without duplicate audits."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from opacus_dmaudit import DMAuditor, read_audit_log
from tests.helpers import audited_run, imprint_model, make_private, train_steps


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
    assert _events(tmp_path / "audit").Tags()["images"] == ["audit/reconstructions"]


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
    # TensorBoard holds each audit once: the crashed run's step-6 audit is purged on resume
    assert [e.step for e in _events(tmp_path).Scalars("quality/raw/mse")] == [2, 4, 6, 8, 10]
