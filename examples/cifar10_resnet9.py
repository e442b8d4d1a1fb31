"""Audit DP-SGD training of a GroupNorm ResNet-9 on CIFAR-10 with a CIFAR-10 diffusion prior.

    python examples/cifar10_resnet9.py                                         # offline defaults
    python examples/cifar10_resnet9.py --prior google/ddpm-cifar10-32          # online prior
    python examples/cifar10_resnet9.py --prior path/to/prior                   # any local prior

ResNet-9 in its Opacus-compatible form: GroupNorm instead of BatchNorm (per-sample gradients need
layers that do not mix samples) and out-of-place residual additions (``x + f(x)``; an in-place
``+=`` would overwrite an activation Opacus's hooks keep). The ImprintBlock's bins are calibrated
on public natural-image patches (``opacus_dmaudit.assets.data.natural_patches``), never on training data.

Training data (``--data``): an ``.npz`` with uint8 NHWC ``images`` and ``labels``; by default the
1017 CIFAR-10 test images in ``../shared/data/cifar10`` beside this checkout. ``--download`` uses
torchvision's CIFAR-10 training set instead (downloaded into ``--data-root``; online only). The
default prior is the embedded natural-image prior (offline); ``google/ddpm-cifar10-32``, trained on
CIFAR-10 itself, is the stronger choice online.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch import nn

from opacus_dmaudit import DiffusionPrior, DMAuditor, ImprintBlock
from opacus_dmaudit.assets.data import load_cifar10_test, natural_patches

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def conv_block(c_in: int, c_out: int, *, pool: bool = False) -> nn.Sequential:
    layers = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(min(32, c_out // 4), c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """``x + body(x)``, out of place."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_block(channels, channels), conv_block(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class Normalize(nn.Module):
    """Per-channel standardisation after the ImprintBlock (which sees pixels in [0, 1])."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def resnet9(num_classes: int = 10, width: int = 64) -> nn.Sequential:
    """ResNet-9 (Page's DAWNBench layout) with GroupNorm; ``width`` 64 is the original."""
    w = width
    return nn.Sequential(
        conv_block(3, w),
        conv_block(w, 2 * w, pool=True),
        Residual(2 * w),
        conv_block(2 * w, 4 * w, pool=True),
        conv_block(4 * w, 8 * w, pool=True),
        Residual(8 * w),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, num_classes),
    )


def load_data(data: str | None, data_root: str, download: bool) -> torch.utils.data.TensorDataset:
    if data is None and not download:
        data = str(SHARED_CIFAR / "cifar10_test_first1017.npz")
        if not Path(data).is_file():
            raise SystemExit(
                f"no CIFAR-10 images at {data}: pass --data IMAGES.npz, or --download to fetch "
                "torchvision's CIFAR-10 (online)"
            )
    if data is not None:
        return torch.utils.data.TensorDataset(*load_cifar10_test(data))
    from torchvision import datasets, transforms

    train = datasets.CIFAR10(data_root, train=True, download=True, transform=transforms.ToTensor())
    images = torch.stack([train[i][0] for i in range(len(train))])
    return torch.utils.data.TensorDataset(images, torch.tensor(train.targets))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default="runs/cifar10_resnet9")
    parser.add_argument(
        "--prior", default="embedded:natural", help="embedded:natural, a hub id, a path, 'none'"
    )
    parser.add_argument("--data", default=None, help=".npz with uint8 NHWC images and labels")
    parser.add_argument("--download", action="store_true", help="torchvision CIFAR-10 (online)")
    parser.add_argument("--data-root", default="data", help="torchvision download folder")
    parser.add_argument("--noise-multiplier", type=float, default=0.003)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=20, help="audit every N steps")
    parser.add_argument("--width", type=int, default=32, help="ResNet-9 base width (64: Page's)")
    parser.add_argument("--num-bins", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    dataset = load_data(args.data, args.data_root, args.download)
    public = torch.from_numpy(natural_patches(count=2000, seed=1)).permute(0, 3, 1, 2) / 255.0
    block = ImprintBlock(image_shape=(3, 32, 32), num_bins=args.num_bins).calibrate(public)
    model = nn.Sequential(block, Normalize(CIFAR_MEAN, CIFAR_STD), resnet9(width=args.width))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        data_loader=torch.utils.data.DataLoader(dataset, batch_size=args.batch_size),
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
    )
    prior = None if args.prior == "none" else DiffusionPrior.from_pretrained(args.prior)
    auditor = DMAuditor(
        privacy_engine=engine, log_dir=args.log_dir, every_n_steps=args.every, prior=prior
    )
    step = 0
    with auditor:
        auditor.attach(optimizer)
        while step < args.steps:
            for xb, yb in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                step += 1
                if step == args.steps:
                    break
    for record in auditor.history:
        lpips_raw, lpips_dm = record.mean("lpips", "raw"), record.mean("lpips", "dm")
        print(
            f"step {record.step:4d}  eps {record.epsilon:.3g}  "
            f"found {record.lone_found}/{record.lone_in_batch}  "
            f"LPIPS raw {lpips_raw or float('nan'):.3f}  "
            f"DM {lpips_dm or float('nan'):.3f}"
        )
    print(f"report: {Path(args.log_dir) / 'report.html'}   tensorboard --logdir {args.log_dir}")
    return auditor.history


if __name__ == "__main__":
    main()
