import json
import math
import os
import stat

import pytest

from opacus_dmaudit import AuditRecord, DMAuditor, read_audit_log
from opacus_dmaudit.privacy.accountant import epsilon_from_accountant
from opacus_dmaudit.sinks.audit_log import AuditLog, read_json_lines
from tests.helpers import imprint_model, make_private, train_steps

REQUIRED = {"step", "epsilon", "noise_multiplier", "max_grad_norm", "sample_rate", "images"}
IMAGE_KEYS = {
    "bin",
    "occupied",
    "noise_std",
    "mse_raw",
    "psnr_raw",
    "ssim_raw",
    "lpips_raw",
    "mse_clean",
    "psnr_clean",
    "ssim_clean",
    "lpips_clean",
}


@pytest.mark.parametrize("sigma", [0.0, 0.01])
def test_each_audit_is_one_flushed_json_line(mnist5k, tmp_path, sigma):
    model = imprint_model(mnist5k["prior"][0][:2000], num_bins=128)
    model, opt, loader, engine = make_private(model, *mnist5k["private"], sigma=sigma)
    log_dir = tmp_path / "private" / "run"
    auditor = DMAuditor(privacy_engine=engine, log_dir=log_dir, every_n_steps=2).attach(opt)
    path = log_dir / "audit.jsonl"

    def readable_right_after_each_audit(i):  # before close()
        assert len(path.read_text().splitlines()) == i // 2

    train_steps(model, opt, loader, 4, after_step=readable_right_after_each_audit)
    auditor.close()
    lines = read_json_lines(path)  # the JSON on disk: release 0.1's keys
    assert [r["step"] for r in lines] == [2, 4]
    for r in lines:
        assert REQUIRED <= set(r)
        assert r["noise_multiplier"] == sigma and r["max_grad_norm"] == 1.0
        assert r["sample_rate"] == pytest.approx(1 / 16)
        scored = [im for im in r["images"] if im["true_count"] > 0]
        assert scored and all(IMAGE_KEYS <= set(im) for im in scored)
    records = read_audit_log(path)  # the same, typed
    assert [r.step for r in records] == [2, 4]
    assert [r.to_json() for r in records] == lines
    if sigma == 0:
        assert all(r.epsilon == math.inf for r in records)
        assert "Infinity" in path.read_text()
    else:
        eps = [r.epsilon for r in records]
        assert 0 < eps[0] < eps[1] < math.inf
    # owner-only: the log describes private training images
    assert stat.S_IMODE(os.stat(log_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_torn_last_line_is_skipped_and_appends_continue(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append(AuditRecord.from_json({"step": 1, "epsilon": math.inf, "x": float("nan")}))
    log.close()
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write('{"step": 2, "epsi')
    (line,) = read_json_lines(tmp_path / "audit.jsonl")
    assert (line["step"], line["epsilon"], line["x"]) == (1, math.inf, None)
    (record,) = read_audit_log(tmp_path / "audit.jsonl")
    assert (record.step, record.epsilon, record.extra) == (1, math.inf, {"x": None})
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append(AuditRecord(step=3))
    log.close()
    assert [r.step for r in read_audit_log(tmp_path / "audit.jsonl")] == [1, 3]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_audit_log(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        read_audit_log(tmp_path / "list.jsonl")
    (tmp_path / "nostep.jsonl").write_text('{"epsilon": 1.0}\n')
    with pytest.raises(ValueError, match="line 1 has no integer 'step'"):
        read_audit_log(tmp_path / "nostep.jsonl")


def test_epsilon_is_inf_without_noise_and_nan_when_accountant_fails():
    class Broken:
        history = [(1.0, 0.1, 1)]

        def get_epsilon(self, delta):
            raise RuntimeError("boom")

    assert epsilon_from_accountant(Broken(), delta=1e-5, noise_multiplier=0.0) == math.inf
    assert math.isnan(epsilon_from_accountant(Broken(), delta=1e-5, noise_multiplier=1.0))
    assert json.loads(json.dumps(math.inf)) == math.inf
