"""Lightning and Hugging Face adapters, run with the real frameworks on the real examples."""

import math
import os
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opacus_dmaudit import read_audit_log
from opacus_dmaudit.integrations import find_dp_optimizer
from tests.helpers import REPO

DELTA = 1e-5


def _framework(name: str):
    try:
        return __import__(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: .ci/run installs the test extras")
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")


def _example(name: str, argv: list[str]):
    return runpy.run_path(str(REPO / "examples" / name))["main"](argv)


def _tags(log_dir) -> dict:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc.Tags()


def _scalar_steps(log_dir, tag) -> list[int]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _check_private_images(audit_dir) -> None:
    """The image grids (training images) went to the auditor's own event file, owner-only."""
    assert "audit/reconstructions" in _tags(audit_dir)["images"]
    own = list(Path(audit_dir).glob("events.out.tfevents*"))
    assert own and all(p.stat().st_mode & 0o777 == 0o600 for p in own)


def _check_exact(records, steps):
    assert [r.step for r in records] == steps
    for r in records:  # σ = 0: every sample alone in its bin comes back exactly
        assert r.counts.lone_found == r.counts.lone_in_batch > 5
        singles = [im for im in r.images if im.true_count == 1]
        assert max(im.metric("mse", "raw") for im in singles) < 1e-9


def _rdp_epsilon(sigma, q, steps):
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(DELTA)


def test_find_dp_optimizer_unwraps_framework_wrappers():
    from opacus import PrivacyEngine

    model = torch.nn.Linear(4, 2)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(8, 4), torch.zeros(8).long()), batch_size=4
    )
    _, dp, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    wrappers = [dp, [dp], {"opt": dp}]
    try:
        from lightning.pytorch.core.optimizer import LightningOptimizer

        wrappers.append([LightningOptimizer(dp)])
    except ImportError:
        pass
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        wrappers.append(Accelerator(cpu=True).prepare_optimizer(dp))  # AcceleratedOptimizer
        AcceleratorState._reset_state(reset_partial_state=True)
    except ImportError:
        pass
    for wrapped in wrappers:
        assert find_dp_optimizer(wrapped) is dp
    with pytest.raises(ValueError, match="make_private"):
        find_dp_optimizer([torch.optim.SGD(model.parameters(), lr=0.1)])
    with pytest.raises(ValueError, match="exactly one"):
        find_dp_optimizer([dp, dp.original_optimizer, _other_dp()])


def _other_dp():
    from opacus.optimizers import DPOptimizer

    p = torch.nn.Parameter(torch.zeros(2))
    return DPOptimizer(
        torch.optim.SGD([p], lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4
    )


@pytest.mark.slow
def test_lightning_callback_exact_audit_tensorboard_and_resume(tmp_path):
    _framework("lightning")
    root = tmp_path / "pl"
    common = ["--root", str(root), "--every", "2", "--prior", "none", "--version", "0"]
    # σ = 0: exact readouts, audit at on_train_batch_end, written to the logger's own run
    trainer, callback = _example(
        "lightning_mnist.py", common + ["--noise-multiplier", "0", "--max-steps", "6"]
    )
    audit_dir = Path(trainer.log_dir) / "dmaudit"
    assert audit_dir == root / "lightning_logs" / "version_0" / "dmaudit"
    _check_exact(read_audit_log(audit_dir / "audit.jsonl"), [2, 4, 6])
    assert (audit_dir / "report.html").is_file()
    tags = _tags(trainer.log_dir)  # the TensorBoardLogger's run: the scalars, no image
    assert "quality/raw/mse" in tags["scalars"] and not tags["images"]
    assert _scalar_steps(trainer.log_dir, "quality/raw/mse") == [2, 4, 6]
    _check_private_images(audit_dir)

    # resume: checkpoint at step 4, run to 6, then resume from 4 to 8 in the same log
    shutil.rmtree(root)
    sigma = ["--noise-multiplier", "0.5", "--checkpoint-every", "4"]
    _example("lightning_mnist.py", common + sigma + ["--max-steps", "6"])
    (ckpt,) = (root / "lightning_logs" / "version_0" / "checkpoints").glob("*step=4.ckpt")
    trainer, callback = _example(
        "lightning_mnist.py", common + sigma + ["--max-steps", "8", "--resume", str(ckpt)]
    )
    records = read_audit_log(audit_dir / "audit.jsonl")
    assert [r.step for r in records] == [2, 4, 6, 8]  # step 6 redone once, not twice
    # TensorBoard too: the first run's step-6 audit is purged, the redone one shows once (at
    # σ = 0.5 nothing is found, so no per-image metric: the success rate is logged at every audit)
    assert _scalar_steps(trainer.log_dir, "quality/raw/success_rate") == [2, 4, 6, 8]
    q = 1 / 16  # Opacus: 1 / len(loader), 1000 digits in batches of 64
    for r in records:  # ε continues across the resume: the accountant came back too
        assert math.isclose(r.epsilon, _rdp_epsilon(0.5, q, r.step), rel_tol=1e-9)
    assert callback.state_dict()["auditor"]["step"] == 8


@pytest.mark.slow
def test_huggingface_callback_exact_audit_tensorboard_and_resume(tmp_path):
    _framework("transformers")
    out = tmp_path / "hf"
    common = ["--output-dir", str(out), "--every", "2", "--prior", "none"]
    trainer, callback = _example(
        "huggingface_mnist.py", common + ["--noise-multiplier", "0", "--max-steps", "6"]
    )
    _check_exact(read_audit_log(out / "dmaudit" / "audit.jsonl"), [2, 4, 6])
    (run_dir,) = (out / "runs").iterdir()  # the Trainer's TensorBoardCallback writer
    tags = _tags(run_dir)
    assert "quality/raw/mse" in tags["scalars"] and not tags["images"]
    assert "train/loss" in tags["scalars"]  # the same run as the Trainer's own scalars
    assert _scalar_steps(run_dir, "quality/raw/mse") == [2, 4, 6]
    _check_private_images(out / "dmaudit")

    shutil.rmtree(out)
    sigma = ["--noise-multiplier", "0.5", "--save-steps", "4"]
    _example("huggingface_mnist.py", common + sigma + ["--max-steps", "6"])
    state = out / "checkpoint-4" / "dmaudit_state.json"
    assert state.is_file() and oct(state.stat().st_mode & 0o777) == "0o600"
    shutil.rmtree(out / "checkpoint-6")  # resume from step 4: the run got further than that
    _example("huggingface_mnist.py", common + sigma + ["--max-steps", "8", "--resume"])
    records = read_audit_log(out / "dmaudit" / "audit.jsonl")
    assert [r.step for r in records] == [2, 4, 6, 8]
    q = 1 / 16  # Opacus: 1 / len(loader), 1000 digits in batches of 64
    for r in records:
        assert math.isclose(r.epsilon, _rdp_epsilon(0.5, q, r.step), rel_tol=1e-9)


@pytest.mark.slow
def test_huggingface_callback_runs_shadow_and_mechanism_modes(mnist5k, tmp_path):
    """The HF callback on a model without an ImprintBlock: shadow audits read the batch from
    the model's ``pixel_values`` input, and the mechanism checks run on every parameter."""
    _framework("transformers")
    from opacus import PrivacyEngine
    from torch import nn
    from transformers import TrainingArguments

    from opacus_dmaudit.demo import digit_cnn
    from opacus_dmaudit.integrations.huggingface import DMAuditTrainerCallback

    ex = runpy.run_path(str(REPO / "examples" / "huggingface_mnist.py"))

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = digit_cnn()

        def forward(self, pixel_values, labels=None):
            logits = self.cnn(pixel_values)
            if labels is None:
                return (logits,)
            return (nn.functional.cross_entropy(logits, labels), logits)

    data = torch.utils.data.TensorDataset(*mnist5k["private"])
    shadow = {"shadow": True, "public": mnist5k["prior"][0][:1000]}
    for mode, extra in (("shadow", shadow), ("mechanism", {})):
        torch.manual_seed(0)
        engine = PrivacyEngine(accountant="rdp")
        model = Plain()
        model, opt, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=torch.utils.data.DataLoader(data, 64, collate_fn=ex["as_dict"]),
            noise_multiplier=0.5,
            max_grad_norm=1.0,
        )
        args = TrainingArguments(
            output_dir=str(tmp_path / mode), max_steps=4, learning_rate=0.5,
            lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no",
            report_to=["tensorboard"], use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = ex["DPTrainer"](model=model, args=args, optimizers=(opt, None), dp_loader=loader)
        trainer.add_callback(ex["ClearDPOptimizer"](opt))
        trainer.add_callback(
            DMAuditTrainerCallback(
                privacy_engine=engine,
                trainer=trainer,
                every_n_steps=2,
                prior=None,
                metrics=("mse",),
                **extra,
            )  # fmt: skip
        )
        trainer.train()
        records = read_audit_log(tmp_path / mode / "dmaudit" / "audit.jsonl")
        assert [r.step for r in records] == [2, 4]
        for r in records:
            assert r.mode == mode and r.valid, r.checks
            statuses = {c.name: c.status for c in r.checks}
            assert {"noise_scale", "clipping", "sampling", "accountant"} <= set(statuses)
            assert r.batch_size > 0  # counted from the model's pixel_values
            if mode == "shadow":
                assert r.counts.lone_in_batch > 0 and "value_range" in statuses
            else:
                assert "value_range" not in statuses and not r.images
