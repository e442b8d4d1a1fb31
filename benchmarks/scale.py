"""Audits at the paper's scale: memory and time of a DP-SGD step with the auditor, up to 256×256.

    python benchmarks/scale.py                 # quick: 32², batch 16
    python benchmarks/scale.py --full          # 32², 64², 128², 256² at batch 64, K = 128
    python benchmarks/scale.py --prior         # also: DDIM throughput of full-size priors

**Training steps.** An ``ImprintBlock`` (K bins, sparse) in front of a GroupNorm ResNet-9 that
sees the image average-pooled to 32×32 (so the downstream network costs the same at every size and
the table shows what the imprint layer and the audit cost). Each configuration runs in its own
process: ``hooks`` (Opacus's default per-sample gradients: the imprint weight's cost
batch × K × C·H·W floats) or ``ghost`` (Opacus's ghost clipping, ``grad_sample_mode="ghost"``: a
norm sampler gives each sample's gradient norm of the imprint layer from its input and its
output gradient, and a second backward pass gives the clipped sum: no per-sample gradient of
the imprint layer is ever stored), each without and with a ``DMAuditor`` attached (every
``--every`` steps, ``--metrics`` (all four by default), at most ``--max-images`` scored images, no
prior). Reported:
the process's peak memory (CPU: peak resident set size; CUDA: ``torch.cuda.max_memory_allocated``)
and how much of it the training steps added over the set-up (model, data, auditor), the median
time of a plain step, of a step with the auditor attached that does not audit, and of an audit
step (the capture and the synchronous audit). ``hooks`` at 256² needs about
2·batch·K·d·4 bytes (≈ 13 GB at batch 64) and runs only with ``--hooks-256``.

**Priors** (``--prior``): DDIM throughput in images per second of random-weight UNets of the
shapes of ``google/ddpm-cifar10-32`` (35.7 M parameters) and ``google/ddpm-celebahq-256``
(113.7 M), fp32 against bf16, the auditor's sampler (DDIM, at most 20 steps of at least 20
timesteps) at noise std 0.2, and optionally ``torch.compile``.

The device is recorded in every table (CUDA when available, else CPU; ``--device`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]  # the checkout (its examples/)
QUICK = {"sizes": (32,), "batch": 16, "bins": 128, "steps": 4, "every": 2}
FULL = {"sizes": (32, 64, 128, 256), "batch": 64, "bins": 128, "steps": 5, "every": 2}


# -- the trained model ----------------------------------------------------------------------------
def resnet9(width: int, num_classes: int = 10) -> nn.Sequential:
    """The CIFAR-10 example's GroupNorm ResNet-9 (``examples/cifar10_resnet9.py``)."""
    example = runpy.run_path(str(ROOT / "examples" / "cifar10_resnet9.py"))
    return example["resnet9"](num_classes=num_classes, width=width)


def images(size: int, count: int, seed: int) -> torch.Tensor:
    """Real CIFAR-10 test images upsampled to ``size`` when ``../shared/data`` is there, else
    smooth random images (memory and time do not depend on the content)."""
    from common import shared_data_dir

    from opacus_dmaudit.assets.data import load_cifar10_test

    shared = shared_data_dir()
    gen = torch.Generator().manual_seed(seed)
    if shared is not None:
        x, _ = load_cifar10_test(shared / "cifar10" / "cifar10_test_first1017.npz")
        x = x[torch.randperm(x.shape[0], generator=gen)[:count]]
    else:
        x = torch.rand((count, 3, 8, 8), generator=gen)
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear").clamp(0, 1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(spec: dict) -> dict:
    """One configuration in this (fresh) process: peak memory and step times."""
    from opacus import PrivacyEngine

    from opacus_dmaudit import DMAuditor, ImprintBlock

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    size, batch, k = spec["size"], spec["batch"], spec["bins"]
    n = 8 * batch  # sampling rate 1/8
    x = images(size, n, seed=1)
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(2))
    public = images(size, max(2 * k, 256), seed=3)
    block = ImprintBlock(image_shape=(3, size, size), num_bins=k).calibrate(public)
    del public
    block.public_sample = None  # the table is about the step, not the attach-time checks
    model = nn.Sequential(block, nn.AdaptiveAvgPool2d(32), resnet9(spec["width"])).to(device)
    engine = PrivacyEngine(accountant="rdp")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    ghost = spec["mode"] == "ghost"
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=spec["sigma"],
        max_grad_norm=1.0,
        grad_sample_mode=spec["mode"],
        **({"criterion": nn.CrossEntropyLoss()} if ghost else {}),
    )
    model, opt, loader = out[0], out[1], out[-1]
    criterion = out[2] if ghost else nn.CrossEntropyLoss()
    auditor = None
    tmp = tempfile.TemporaryDirectory()
    if spec["audit"]:
        auditor = DMAuditor(
            privacy_engine=engine,
            log_dir=tmp.name,
            every_n_steps=spec["every"],
            max_images=spec["max_images"],
            metrics=tuple(spec["metrics"]),
            tensorboard=False,
            report=False,
            save_images=False,
        ).attach(opt)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times, audited = [], []
    batches = iter(loader)
    for step in range(1, spec["steps"] + 1):
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(loader)
            xb, yb = next(batches)
        xb, yb = xb.to(device), yb.to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        criterion(model(xb), yb).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        audited.append(auditor is not None and step % spec["every"] == 0)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    lone = None
    if auditor is not None:
        lone = [r.counts.lone_found if r.counts else None for r in auditor.history]
        auditor.close()
    tmp.cleanup()
    plain = [t for t, a in zip(times[1:], audited[1:]) if not a]  # the first step warms up
    audit = [t for t, a in zip(times, audited) if a]
    return {
        **spec,
        "peak_bytes": peak,
        "step_bytes": peak - base,
        "step_s": statistics.median(plain) if plain else None,
        "audit_step_s": statistics.median(audit) if audit else None,
        "found": lone,
    }


def run_child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _gb(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def _ms(value) -> str:
    return "n/a" if value is None else f"{1e3 * value:.0f}"


def training_table(args, settings: dict) -> list[dict]:
    rows = []
    for size in settings["sizes"]:
        d = 3 * size * size
        for mode in args.modes:
            spec_base = {
                "size": size,
                "mode": mode,
                "batch": settings["batch"],
                "bins": settings["bins"],
                "steps": settings["steps"],
                "every": settings["every"],
                "sigma": args.sigma if args.sigma else args.readout_std / (0.5 * d**0.5),
                "width": args.width,
                "max_images": args.max_images,
                "metrics": list(args.metrics),
                "device": args.device,
            }
            per_sample = 2 * settings["batch"] * settings["bins"] * d * 4
            if mode == "hooks" and per_sample > args.hooks_limit_gb * 2**30:
                rows.append({**spec_base, "audit": False, "skipped": per_sample})
                continue
            for audit in (False, True):
                rows.append(run_child({**spec_base, "audit": audit}))
    print(
        f"device: {device_name(args.device)}; torch {torch.__version__}; batch "
        f"{settings['batch']} (expected, Poisson), K = {settings['bins']} sparse bins, "
        f"ResNet-9 width {args.width} on the image pooled to 32x32, σ = "
        f"{args.sigma or f'{args.readout_std:g} / (0.5·sqrt(d)) per size'}, "
        f"{settings['steps']} steps, audit every {settings['every']} (max_images "
        f"{args.max_images}, metrics {','.join(args.metrics)}, no prior)"
    )
    print(
        f"{'size':>8} {'σ':>8} {'mode':<6} {'auditor':<8} {'peak GB':>8} {'step GB':>8} {'step ms':>8} "
        f"{'audit-step ms':>14} {'lone found':>11}"
    )
    for r in rows:
        name = f"{r['size']}x{r['size']} {r['sigma']:>8.2g}"
        if "skipped" in r:
            print(
                f"{name:>17} {r['mode']:<6} {'-':<8} skipped: per-sample gradients of the imprint "
                f"layer alone need ~{_gb(r['skipped'])} GB (--hooks-256 to run)"
            )
            continue
        if "error" in r:
            print(f"{name:>17} {r['mode']:<6} {str(r['audit']):<8} error: {r['error']}")
            continue
        found = "-" if not r["found"] else "/".join(str(f) for f in r["found"])
        print(
            f"{name:>17} {r['mode']:<6} {'with' if r['audit'] else 'without':<8} "
            f"{_gb(r['peak_bytes']):>8} {_gb(r['step_bytes']):>8} {_ms(r['step_s']):>8} "
            f"{_ms(r['audit_step_s']):>14} {found:>11}"
        )
    print(
        "(peak GB: the process's peak memory; step GB: what the training steps added over the "
        "set-up;\n step ms: median step that does not audit (the auditor's hooks attached in "
        "'with'); audit-step ms: capture + synchronous audit)"
    )
    return rows


# -- priors ---------------------------------------------------------------------------------------
PRIOR_SHAPES = {
    "cifar10-32": dict(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    "celebahq-256": dict(
        sample_size=256,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ),
}


def ddpm_unet(shape: str, *, width_divisor: int = 1):
    """A random-weight ``UNet2DModel`` in the layout of ``google/ddpm-<shape>`` (config.json of
    those repositories; ``width_divisor`` narrows every block for plumbing tests)."""
    from diffusers import UNet2DModel

    cfg = dict(PRIOR_SHAPES[shape])
    channels = tuple(c // width_divisor for c in cfg.pop("block_out_channels"))
    return UNet2DModel(
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=channels,
        act_fn="silu",
        attention_head_dim=None,
        center_input_sample=False,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        mid_block_scale_factor=1,
        norm_eps=1e-6,
        norm_num_groups=min(32, min(channels)),
        time_embedding_type="positional",
        **cfg,
    )


def prior_table(args) -> list[dict]:
    from diffusers import DDPMScheduler

    from opacus_dmaudit import DiffusionPrior

    rows = []
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    for shape in args.prior_shapes:
        torch.manual_seed(0)
        unet = ddpm_unet(shape)
        params = sum(p.numel() for p in unet.parameters())
        size = PRIOR_SHAPES[shape]["sample_size"]
        count = args.prior_images or (64 if size <= 32 else 4)
        if args.device == "cpu" and size > 32:
            count = args.prior_images or 1
        x = images(size, count, seed=4)
        noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        for dtype in (torch.float32, torch.bfloat16):
            for compiled in (False, True) if args.compile else (False,):
                prior = DiffusionPrior(
                    unet, sched.alphas_cumprod, device=args.device, dtype=dtype, source=shape
                )
                if compiled:
                    prior.unet = torch.compile(prior.unet)
                kw = dict(noise_std=0.2, sampler="ddim", steps=20, min_stride=20)
                prior.denoise(noisy[: min(count, 2)], **kw)  # warm up (and compile)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                prior.denoise(noisy, batch_size=count, **kw)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                rows.append(
                    {
                        "shape": shape,
                        "parameters": params,
                        "dtype": str(dtype).replace("torch.", ""),
                        "compiled": compiled,
                        "images": count,
                        "t_star": int(prior.timesteps_for(0.2)[0]),
                        "seconds": seconds,
                        "images_per_s": count / seconds,
                    }
                )
    print(
        f"device: {device_name(args.device)}; DDIM (at most 20 steps of at least 20 timesteps) at "
        "noise std 0.2, random weights, one batch"
    )
    print(
        f"{'prior shape':<14} {'params':>8} {'dtype':<9} {'compiled':<9} {'images':>7} "
        f"{'t*':>4} {'seconds':>8} {'images/s':>9}"
    )
    for r in rows:
        print(
            f"{r['shape']:<14} {r['parameters'] / 1e6:>7.1f}M {r['dtype']:<9} "
            f"{str(r['compiled']):<9} {r['images']:>7} {r['t_star']:>4} {r['seconds']:>8.2f} "
            f"{r['images_per_s']:>9.2f}"
        )
    return rows


def main(argv=None) -> int:
    from opacus_dmaudit.config import AuditConfig
    from opacus_dmaudit.schema import METRICS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sigma", type=float, help="noise multiplier (default: per size)")
    parser.add_argument(
        "--readout-std",
        type=float,
        default=0.1,
        help="without --sigma: σ per size so that a readout's noise std is about this "
        "(σ = std / (0.5·sqrt(d)), pixels of rms 0.5), so images are found and scored",
    )
    parser.add_argument("--width", type=int, help="ResNet-9 width (default 64 on CUDA, 16 on CPU)")
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=list(AuditConfig().metrics),
        choices=list(METRICS),
        help="the auditor's (default: all four)",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["hooks", "ghost"], choices=["hooks", "ghost"]
    )
    parser.add_argument("--hooks-256", action="store_true", help="run hooks mode at 256x256 too")
    parser.add_argument("--no-training", action="store_true", help="only the prior table")
    parser.add_argument("--prior", action="store_true", help="add the prior throughput table")
    parser.add_argument(
        "--prior-shapes", nargs="+", default=list(PRIOR_SHAPES), choices=list(PRIOR_SHAPES)
    )
    parser.add_argument("--prior-images", type=int, help="images per prior batch")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.width is None:
        args.width = 64 if args.device.startswith("cuda") else 16
    settings = dict(FULL if args.full else QUICK)
    for key in ("sizes", "batch", "steps"):
        if getattr(args, key):
            settings[key] = tuple(args.sizes) if key == "sizes" else getattr(args, key)
    args.hooks_limit_gb = 1e9 if args.hooks_256 else 8.0
    result: dict = {"device": device_name(args.device), "torch": torch.__version__}
    if not args.no_training:
        result["training"] = training_table(args, settings)
    if args.prior or args.no_training:
        result["prior"] = prior_table(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
