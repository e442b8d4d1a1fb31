"""Audits at 256x256 (memory, a CelebA-HQ-layout prior) and audits off the training path."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from opacus_dmaudit import DiffusionPrior, DMAuditor, ImprintBlock, read_audit_log
from opacus_dmaudit.errors import AuditCheckFailed
from opacus_dmaudit.sinks.audit_log import read_json_lines
from tests.helpers import audited_run, make_private, train_steps

#: What the capture at 3x256x256, K = 128, batch 64 does in a fresh process (ghost clipping).
CAPTURE_256 = r"""
import json, resource, torch
from torch import nn
from opacus import PrivacyEngine
from opacus_dmaudit import ImprintBlock
from opacus_dmaudit.capture.hooks import GradientCapture
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.score.scoring import read_step

torch.manual_seed(0)
size, batch, k = 256, 64, 128
smooth = lambda n: nn.functional.interpolate(torch.rand(n, 3, 8, 8), size=(size, size),
                                             mode="bilinear").clamp(0, 1)
x, public = smooth(batch), smooth(256)
block = ImprintBlock(image_shape=(3, size, size), num_bins=k).calibrate(public)
del public
block.public_sample = None
model = nn.Sequential(block, nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(192, 10))
engine = PrivacyEngine(accountant="rdp")
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(batch).long()),
                                     batch_size=batch)
model, opt, crit, loader = engine.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
    noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False,
    grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss())
caps = []
capture = GradientCapture(opt, block=block, should_capture=lambda s: True, on_capture=caps.append)
capture.attach()
xb, yb = next(iter(loader))
opt.zero_grad()
crit(model(xb), yb).backward()
opt.step()
captured = caps[0]
noised, clean = read_step(captured, AuditConfig())
members = captured.imprint.membership
lone = ((members != 0).sum(dim=1) == 1).nonzero().flatten()
err = 0.0
for b in lone.tolist():
    i = int(members[b].nonzero()[0, 0])
    err = max(err, float((noised.images[b] - captured.inputs[i]).abs().max()))
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "lone": len(lone), "max_abs_error": err,
                  "grad_sample": getattr(block.imprint.weight, "grad_sample", None) is not None}))
"""


@pytest.mark.slow
def test_capture_at_256px_under_ghost_clipping_stays_within_a_few_gb():
    """3x256x256, K = 128, batch 64: per-sample imprint gradients would be 6.4 GB on their own;
    ghost clipping never makes them, and the capture reads the lone images exactly (σ = 0)."""
    proc = subprocess.run(
        [sys.executable, "-c", CAPTURE_256], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    per_sample = 64 * 128 * 3 * 256 * 256 * 4
    # Measured 2.5 GB here and 3.3 GB on CI (allocator and thread count differ); materialising the
    # per-sample imprint gradients (hooks mode) would need more than 2 x per_sample = 12.8 GB.
    assert out["peak"] < 0.75 * per_sample
    assert out["lone"] >= 20 and out["max_abs_error"] < 1e-4
    assert not out["grad_sample"]


#: config.json of google/ddpm-celebahq-256 (the flat repository layout), every width / 8.
CELEBAHQ_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [16, 16, 32, 32, 64, 64],  # 128, 128, 256, 256, 512, 512 on the Hub
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 16,  # 32 on the Hub
    "out_channels": 3,
    "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
CELEBAHQ_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}


@pytest.fixture(scope="module")
def celebahq_prior(tmp_path_factory):
    """``from_pretrained("google/ddpm-celebahq-256")`` served from a local Hub cache (no network):
    random weights in the repository's flat layout (plumbing only, not quality)."""
    from diffusers import UNet2DModel

    cache = tmp_path_factory.mktemp("hub")
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = cache / "models--google--ddpm-celebahq-256"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(0)
    UNet2DModel.from_config(CELEBAHQ_CONFIG).save_pretrained(snap)
    (snap / "config.json").write_text(json.dumps(CELEBAHQ_CONFIG))  # the Hub's keys, verbatim
    (snap / "scheduler_config.json").write_text(json.dumps(CELEBAHQ_SCHEDULER))
    (snap / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            }
        )
    )
    return DiffusionPrior.from_pretrained(
        "google/ddpm-celebahq-256", cache_dir=cache, local_files_only=True, dtype=torch.float32
    )


@pytest.mark.slow
def test_audit_at_256px_with_a_celebahq_layout_prior(celebahq_prior, tmp_path):
    prior = celebahq_prior
    assert prior.model_shape == (3, 256, 256) and prior.source == "google/ddpm-celebahq-256"
    assert prior.timesteps_for(0.5).item() == 258  # linear β: σ_t nearest 2·0.5 (in [-1, 1] units)
    torch.manual_seed(0)
    x = nn.functional.interpolate(torch.rand(80, 3, 8, 8), size=(256, 256), mode="bilinear")
    block = ImprintBlock(image_shape=(3, 256, 256), num_bins=32).calibrate(x[48:])
    block.public_sample = None  # no attach-time checks on public images (κ̂, prior fit): plumbing
    model = nn.Sequential(block, nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(192, 10))
    y = torch.zeros(48, dtype=torch.long)
    model, opt, loader, engine = make_private(model, x[:48], y, sigma=2e-4, batch_size=8)
    auditor = DMAuditor(
        privacy_engine=engine,
        log_dir=tmp_path,
        every_n_steps=1,
        prior=prior,
        sampler="posterior-mean",  # one model call: this is plumbing
        metrics=("mse", "psnr", "ssim"),
        max_images=2,
        prior_fit_audit=1,
    ).attach(opt)
    train_steps(model, opt, loader, 1)
    auditor.close()
    (record,) = read_audit_log(tmp_path / "audit.jsonl")
    scored = [im for im in record.images if "mse_dm" in im.metrics]
    assert scored and all(0 <= im.metric("ssim", "dm") <= 1 for im in scored)
    assert record.denoiser["prior"] == "google/ddpm-celebahq-256"
    assert "prior_fit_audit" in {c.name for c in record.checks}
    assert auditor.last_result.dm.shape[1:] == (3, 256, 256)
    with __import__("numpy").load(tmp_path / "images" / f"step_{record.step:08d}.npz") as f:
        assert f["dm"].shape[1:] == (3, 256, 256)
    assert (tmp_path / "report.html").is_file()


# -- background audits ---------------------------------------------------------------------------
def _run(mnist5k, log_dir, *, background, steps=4, **kwargs):
    auditor, _ = audited_run(
        mnist5k,
        log_dir,
        sigma=0.02,
        steps=steps,
        every=2,
        calibration=512,
        seed=3,
        background=background,
        tensorboard=False,
        close=True,
        **kwargs,
    )
    return auditor


@pytest.mark.slow
def test_background_audits_write_the_same_records_in_step_order(mnist5k, tmp_path):
    kwargs = dict(prior="embedded:mnist", max_images=4, metrics=("mse", "ssim"), prior_fit_public=2)
    sync = _run(mnist5k, tmp_path / "sync", background=False, **kwargs)
    back = _run(mnist5k, tmp_path / "back", background=True, **kwargs)
    # the JSON on disk, line by line
    a = read_json_lines(tmp_path / "sync" / "audit.jsonl")
    b = read_json_lines(tmp_path / "back" / "audit.jsonl")
    assert [r["step"] for r in b] == [2, 4] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        for r in (ra, rb):
            r.pop("audit_seconds", None)
            for c in r["checks"]:
                c.pop("seconds", None)
        assert ra == rb  # same generator draws, same numbers, whatever thread ran them
    assert sync.state_dict()["generator"] == back.state_dict()["generator"]
    assert (tmp_path / "back" / "report.html").is_file()


def test_a_failed_check_in_the_background_reaches_the_training_loop(mnist5k, tmp_path):
    """strict=True: the worker's AuditCheckFailed is raised in the training thread."""
    x, y = mnist5k["private"]
    with pytest.raises(AuditCheckFailed, match="value_range"):
        audited_run(
            mnist5k,
            tmp_path,
            sigma=0.02,
            steps=3,
            train=(x * 255, y),  # 0..255 pixels
            calibration=512,
            seed=3,
            background=True,
            strict=True,
            metrics=("mse",),
            tensorboard=False,
            report=False,
            close=True,
        )
    assert read_audit_log(tmp_path / "audit.jsonl")  # the failing audit was logged first
