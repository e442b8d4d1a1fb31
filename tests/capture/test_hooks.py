"""The auditor on real Opacus training: exact recovery without noise in every supported mode."""

import pytest
import torch

from opacus_dmaudit import DMAuditor, ImprintBlock
from tests.helpers import (
    audited_run,
    imprint_model,
    make_private,
    private_training,
    small_cnn,
    train_steps,
)

FAST_METRICS = ("mse", "ssim")


def train_audited(
    mnist5k,
    tmp_path,
    *,
    sigma=0.0,
    steps=4,
    every=2,
    structure="sparse",
    bmm_physical=None,
    n_train=1000,
    metrics=FAST_METRICS,
    **private,
):
    """Audit ``steps`` steps on ``n_train`` private digits; ``private``: Opacus settings
    (``grad_sample_mode``, ``loss_reduction``, ``clipping``, ``batch_size``)."""
    x, y = mnist5k["private"]
    x, y = x[:: 1000 // n_train][:n_train], y[:: 1000 // n_train][:n_train]
    return audited_run(
        mnist5k,
        tmp_path,
        sigma=sigma,
        steps=steps,
        every=every,
        train=(x, y),
        calibration=2000,
        block={"structure": structure},
        private=private,
        bmm=bmm_physical,
        close=True,
        metrics=metrics,
    )


def assert_exact(auditor, min_found=10):
    assert auditor.history, "no audit ran"
    found = 0
    for record in auditor.history:
        assert record.counts.lone_found == record.counts.lone_in_batch
        for im in record.images:
            if im.true_count == 1:
                assert im.residual_std_raw < 1e-5
                assert im.metric("mse", "raw") < 1e-8
                found += 1
    assert found >= min_found


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "functorch", "ghost"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_exact_recovery_without_noise(mnist5k, tmp_path, grad_sample_mode, loss_reduction):
    auditor, _ = train_audited(
        mnist5k, tmp_path, grad_sample_mode=grad_sample_mode, loss_reduction=loss_reduction
    )
    assert [r.step for r in auditor.history] == [2, 4]
    assert_exact(auditor)


def test_exact_recovery_cumulative(mnist5k, tmp_path):
    auditor, _ = train_audited(mnist5k, tmp_path, structure="cumulative")
    assert_exact(auditor)


def test_max_abs_error_of_raw_readout_below_1e4(mnist5k, tmp_path):
    """Max abs pixel error of every singleton readout, both structures, in [0, 1] units."""
    for structure in ("sparse", "cumulative"):
        auditor, _ = train_audited(mnist5k, tmp_path / structure, structure=structure, steps=2)
        res = auditor.last_result
        # each scored image's row in the step's truth/raw arrays
        singles = [im.row for im in res.record.scored if im.true_count == 1]
        assert len(singles) >= 10
        err = (res.raw[singles] - res.truth[singles]).abs().max()
        assert err < 1e-4, structure


def test_batch_memory_manager_sees_the_whole_logical_batch(mnist5k, tmp_path):
    auditor, _ = train_audited(mnist5k, tmp_path, batch_size=64, bmm_physical=16)
    # logical batches of ~64 real samples, read from 4+ physical batches
    assert all(r.batch_size > 30 for r in auditor.history)
    assert_exact(auditor)


def test_empty_poisson_batches(mnist5k, tmp_path):
    """Tiny sampling rate: most batches are empty; the audit logs them instead of crashing."""
    auditor, _ = train_audited(
        mnist5k, tmp_path, batch_size=1, n_train=200, steps=20, every=1, sigma=0.0
    )
    sizes = [r.batch_size for r in auditor.history]
    assert len(sizes) == 20 and 0 in sizes and max(sizes) > 0
    for r in auditor.history:
        if r.batch_size == 0:
            assert r.images == [] and r.counts.lone_in_batch == 0
    assert_exact(auditor, min_found=1)


def test_per_layer_clipping_warns_and_recovers_up_to_scale(mnist5k, tmp_path):
    with pytest.warns(UserWarning, match="up to scale"):
        auditor, _ = train_audited(mnist5k, tmp_path, clipping="per_layer", steps=2)
    res = auditor.last_result
    singles = [im.row for im in res.record.scored if im.true_count == 1]
    assert singles
    # same image up to a positive scale: correlation 1
    for i in singles[:5]:
        a, b = res.raw[i].flatten().double(), res.truth[i].flatten().double()
        if a.max() < 1:  # not clipped at the top of the range
            assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.999


def test_step_hook_is_chained_and_restored(mnist5k, tmp_path):
    model = imprint_model(mnist5k["prior"][0][:500], num_bins=32)
    model, opt, loader, engine = make_private(model, *mnist5k["private"])
    accountant_hook = opt.step_hook
    with DMAuditor(
        privacy_engine=engine, log_dir=tmp_path, every_n_steps=1, metrics=FAST_METRICS
    ) as auditor:
        auditor.attach(opt)
        assert opt.step_hook != accountant_hook
        train_steps(model, opt, loader, 3)
        assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == 3
        with pytest.raises(RuntimeError, match="already attached"):
            auditor.attach(opt)
    assert opt.step_hook == accountant_hook
    assert [r.step for r in auditor.history] == [1, 2, 3]
    assert all(r.sample_rate == pytest.approx(1 / len(loader)) for r in auditor.history)


def test_attach_errors_are_clear(mnist5k, tmp_path):
    auditor = DMAuditor(log_dir=tmp_path, metrics=FAST_METRICS)
    plain = imprint_model(mnist5k["prior"][0][:500], num_bins=16)
    with pytest.raises(TypeError, match="make_private"):
        auditor.attach(torch.optim.SGD(plain.parameters(), lr=0.1))

    _, opt, _, _ = make_private(small_cnn(), *mnist5k["private"])
    nothing = DMAuditor(log_dir=tmp_path / "none", metrics=FAST_METRICS, mechanism_checks=False)
    with pytest.raises(ValueError, match="no ImprintBlock.*mechanism_checks=True"):
        nothing.attach(opt)  # neither a block, nor shadow, nor the mechanism checks: nothing to do

    model = imprint_model(mnist5k["prior"][0][:500], num_bins=16)
    _, opt, _, _ = make_private(model, *mnist5k["private"])
    with pytest.raises(ValueError, match="image_shape matching your data"):
        auditor.attach(opt, example_input=torch.rand(2, 3, 32, 32))
    other = ImprintBlock(image_shape=(1, 28, 28), num_bins=16)
    with pytest.raises(ValueError, match="trainable parameters of this optimizer"):
        auditor.attach(opt, block=other)
    with pytest.raises(ValueError, match="every_n_steps"):
        DMAuditor(log_dir=tmp_path, every_n_steps=0)
    with pytest.raises(ValueError, match="sampler_min_stride"):
        DMAuditor(log_dir=tmp_path, sampler_min_stride=0)
    with pytest.raises(ValueError, match="unknown metrics"):
        DMAuditor(log_dir=tmp_path, metrics=("psnr", "fid"))


# -- Opacus 1.6's other modes -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mechanism", "shadow", "imprint"])
def test_make_private_without_wrapping_the_model_is_audited(mnist5k, tmp_path, mode):
    """make_private(..., wrap_model=False) (the Hugging Face path) hooks the user's own model and
    returns a GradSampleHooks object; either may be given as model=."""
    x, y = mnist5k["private"]
    torch.manual_seed(0)
    if mode == "imprint":
        model = imprint_model(mnist5k["prior"][0][:500], num_bins=64)
    else:
        model = small_cnn()
    p = private_training(model, x, y, sigma=1.0 if mode == "mechanism" else 0.01,
                         wrap_model=False)  # fmt: skip
    assert type(p.model).__name__ == "GradSampleHooks"
    auditor = DMAuditor(privacy_engine=p.engine, log_dir=tmp_path, every_n_steps=2,
                        metrics=FAST_METRICS, shadow=mode == "shadow",
                        public=mnist5k["prior"][0][:500], tensorboard=False, report=False,
                        save_images=False)  # fmt: skip
    auditor.attach(p.optimizer, model=p.model if mode == "shadow" else model)
    train_steps(model, p.optimizer, p.loader, 2)
    auditor.close()
    (record,) = auditor.history
    assert record.mode == mode and record.valid is True, record.checks
    assert {"noise_scale", "clipping", "sampling"} <= {c.name for c in record.checks}
    if mode != "mechanism":
        assert record.counts.lone_found >= 10  # images read through the unwrapped model


def test_fsdp_is_refused_at_attach_with_what_is_supported(tmp_path):
    """FSDP shards the sums the audit reads: a real FSDP optimizer (one process, gloo) is refused
    with a message that says what is supported."""
    import torch.distributed as dist
    from opacus import PrivacyEngine
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        fully_shard(model)
        data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(2, (64,)))
        model, opt, _, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=torch.utils.data.DataLoader(data, batch_size=8), noise_multiplier=1.0,
            max_grad_norm=1.0, grad_sample_mode="ghost_fsdp", criterion=torch.nn.CrossEntropyLoss(),
        )  # fmt: skip
        auditor = DMAuditor(log_dir=tmp_path / "audit", tensorboard=False, report=False)
        with pytest.raises(ValueError, match="FSDP.*not supported.*Supported: one process"):
            auditor.attach(opt, model=model)
        assert not (tmp_path / "audit" / "audit.jsonl").exists()
    finally:
        dist.destroy_process_group()
