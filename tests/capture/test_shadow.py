"""Shadow audits: a model without an ImprintBlock, the worst-case imprint adversary simulated."""

import html
import json

import pytest
import torch
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opacus_dmaudit import DMAuditor, read_audit_log
from opacus_dmaudit.capture.shadow import ShadowAdversary, as_images
from opacus_dmaudit.schema import MODES
from tests.helpers import audited_run, make_private, small_cnn


def _audit(mnist5k, log_dir, *, mode, sigma, steps, **kwargs):
    """Train on the real digits with a live imprint model or a plain CNN (shadow); the noise has
    its own generator, so both modes draw the same Poisson batches from the global RNG."""
    torch.manual_seed(0)
    kwargs.setdefault("metrics", ("mse", "ssim"))
    auditor, _ = audited_run(
        mnist5k,
        log_dir,
        sigma=sigma,
        steps=steps,
        model=None if mode == "imprint" else small_cnn(),
        private={"noise_generator": torch.Generator().manual_seed(5)},
        shadow=mode == "shadow",
        public=mnist5k["prior"][0][:1000],
        close=True,
        **kwargs,
    )
    return auditor


def test_shadow_audit_reads_the_real_batch_and_is_labelled_everywhere(mnist5k, tmp_path):
    auditor = _audit(mnist5k, tmp_path, mode="shadow", sigma=0.0, steps=2, save_images=True)
    for record in auditor.history:
        assert record.mode == "shadow"
        # σ = 0: every sample alone in a simulated bin comes back exactly
        assert record.counts.lone_found == record.counts.lone_in_batch > 10
        singles = [im for im in record.images if im.true_count == 1]
        assert max(im.metric("mse", "raw") for im in singles) < 1e-9
        assert {c.name for c in record.checks} >= {"value_range", "noise_scale", "sampling"}
        assert record.valid
    run = json.loads((tmp_path / "run.json").read_text())["config"]
    assert run["mode"] == "shadow" and run["imprint_block"] is None
    assert run["shadow"]["calibrated"] and run["shadow"]["num_bins"] == 128
    page = (tmp_path / "report.html").read_text()
    assert html.escape(MODES["shadow"]) in page and "simulated adversary (shadow)" in page
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert (
        "shadow/quality/raw/mse" in tags["scalars"] and "shadow/reconstructions" in tags["images"]
    )
    assert not any(t.startswith("quality/") for t in tags["scalars"])
    assert "checks/noise_scale/status" in tags["scalars"]  # the real run keeps its names


def test_shadow_needs_the_model_and_image_inputs(mnist5k, tmp_path):
    _, opt, _, engine = make_private(small_cnn(), *mnist5k["private"])
    auditor = DMAuditor(privacy_engine=engine, log_dir=tmp_path, shadow=True)
    with pytest.raises(ValueError, match="attach\\(optimizer, model=model\\)"):
        auditor.attach(opt)
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        as_images(torch.zeros(4, 784))
    with pytest.raises(ValueError, match="shadow must be"):
        DMAuditor(log_dir=tmp_path, shadow="yes")
    with pytest.raises(ValueError, match="structure"):
        ShadowAdversary(structure="dense")


def _interval(successes: int, trials: int) -> tuple[float, float]:
    lo = stats.beta.ppf(0.025, successes, trials - successes + 1) if successes else 0.0
    hi = stats.beta.isf(0.025, successes + 1, trials - successes) if successes < trials else 1.0
    return float(lo), float(hi)


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [0.003, 0.01, 0.02])
def test_shadow_success_agrees_with_the_live_imprint_block(mnist5k, tmp_path, sigma):
    """The same batches (the noise has its own generator), the same bins: the live block's
    success rate and the simulated adversary's lie within each other's 95% intervals."""
    rates = {}
    for mode in ("imprint", "shadow"):
        auditor = _audit(
            mnist5k,
            tmp_path / mode,
            mode=mode,
            sigma=sigma,
            steps=8,
            tensorboard=False,
            report=False,
            save_images=False,
        )
        hits = sum(round(r.success["raw"] * r.batch_size) for r in auditor.history)
        trials = sum(r.batch_size for r in auditor.history)
        rates[mode] = (hits / trials, _interval(hits, trials))
        assert not [c for r in auditor.history for c in r.checks if c.status == "fail"]
    (live, live_ci), (shadow, shadow_ci) = rates["imprint"], rates["shadow"]
    assert 0.05 < live < 0.95  # a σ where the attack partly succeeds, so the test can disagree
    assert live_ci[0] <= shadow <= live_ci[1] and shadow_ci[0] <= live <= shadow_ci[1], rates


class _KeywordModel(torch.nn.Module):
    """Takes its batch as ``pixel_values=`` (as Hugging Face models do)."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()

    def forward(self, pixel_values):
        return self.net(pixel_values)


def test_shadow_reads_a_batch_given_by_keyword(mnist5k, tmp_path):
    x, y = mnist5k["private"]
    torch.manual_seed(0)
    model, opt, loader, engine = make_private(_KeywordModel(), x, y, sigma=0.0)
    auditor = DMAuditor(
        privacy_engine=engine,
        log_dir=tmp_path,
        every_n_steps=1,
        shadow=True,
        public=mnist5k["prior"][0][:1000],
        metrics=("mse",),
    ).attach(opt, model=model)
    for i, (xb, yb) in enumerate(loader, start=1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(pixel_values=xb), yb).backward()
        opt.step()
        assert auditor.history[-1].batch_size == xb.shape[0]  # counted from the keyword
        if i == 2:
            break
    auditor.close()
    assert all(r.counts.lone_found == r.counts.lone_in_batch > 5 for r in auditor.history)


@pytest.mark.slow
def test_lightning_callback_runs_shadow_and_mechanism_modes(mnist5k, tmp_path):
    """The Lightning callback on a model without an ImprintBlock: shadow audits and the
    mechanism checks, the batch read from the LightningModule's forward."""
    pl = pytest.importorskip("lightning.pytorch")
    from opacus import PrivacyEngine

    from opacus_dmaudit.integrations.lightning import DMAuditCallback

    x, y = mnist5k["private"]

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()
            self.privacy_engine = PrivacyEngine(accountant="rdp")

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), 64)
            _, optimizer, self._loader = self.privacy_engine.make_private(
                module=self.net,
                optimizer=torch.optim.SGD(self.net.parameters(), lr=0.1),
                data_loader=loader,
                noise_multiplier=0.5,
                max_grad_norm=1.0,
            )
            return optimizer

        def train_dataloader(self):
            return self._loader if self._loader is not None else [(x[:64], y[:64])]

    shadow = {"shadow": True, "public": mnist5k["prior"][0][:1000]}
    for mode, extra in (("shadow", shadow), ("mechanism", {})):
        torch.manual_seed(0)
        module = Plain()
        module._loader = None
        callback = DMAuditCallback(
            log_dir=tmp_path / mode, every_n_steps=2, metrics=("mse",), **extra
        )
        trainer = pl.Trainer(
            max_steps=4,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            reload_dataloaders_every_n_epochs=1,
        )
        trainer.fit(module)
        records = read_audit_log(tmp_path / mode / "audit.jsonl")
        assert [r.step for r in records] == [2, 4] and {r.mode for r in records} == {mode}
        for r in records:
            statuses = {c.name: c.status for c in r.checks}
            assert {"noise_scale", "clipping", "sampling", "accountant"} <= set(statuses)
            assert "fail" not in statuses.values(), r.checks
            assert r.batch_size > 30  # the batch came through the module's forward
        if mode == "shadow":
            assert sum(r.counts.lone_in_batch for r in records) > 10
