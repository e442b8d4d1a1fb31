"""What the ImprintBlock costs the model: test accuracy without it and with gradient_scale 1, 10, 100.

    python benchmarks/utility.py            # quick: a few steps per configuration, one seed
    python benchmarks/utility.py --full     # MNIST: 8 epochs, 3 seeds; CIFAR-10: 12 epochs, 2 seeds

A live imprint audit trains an adversarial variant of the user's model: the block's gradient,
scaled by ``gradient_scale`` (α), takes part of every sample's clipping budget C, so the rest of
the model learns from a smaller share of it. This script trains the same model with the same
DP-SGD (σ = 1, C = 1, Poisson sampling) without the block and with the block at α = 1, 10 and 100
(the default), and reports test accuracy (mean ± std over seeds) and the imprint's median share
of a sample's squared gradient norm (measured once after training on a training batch).

* **MNIST**: the demo's GroupNorm CNN (``opacus_dmaudit.assets.models.small_cnn(1, 28)``) on the
  4000 digits of MNIST-5k's prior split (the block calibrated on the disjoint 1000 of the private
  split), tested on the 10,000 official MNIST test digits (quick mode: the first 300); batch 128,
  SGD lr 0.5.
* **CIFAR-10**: ``examples/cifar10_resnet9.py``'s GroupNorm ResNet-9 (width ``--width``) behind
  the block and the example's normalisation, on the 1017 CIFAR-10 test images in
  ``../shared/data`` (the only CIFAR-10 images here): the first 817 train, the last 200 test;
  the block calibrated on natural-image patches; batch 128, SGD lr 0.05 with momentum 0.9, chosen
  for the model without the block (seed 0) on a validation split (train on the first 717 images,
  validate on the next 100; batch/lr 64/0.1: 0.11, 256/0.5: 0.12, 256/0.1: 0.20, 128/0.05: 0.20,
  the cheaper of the best two). With 817 training images and σ = 1 accuracy stays low (~20 %) and
  200 test images resolve differences of only about ±0.06; the MNIST comparison is the sharp one.

The audit itself is not attached (it never changes training, ``tests/test_noninterference.py``);
what is measured is the block.
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from common import shared_data_dir
from opacus import PrivacyEngine
from torch import nn

from opacus_dmaudit import ImprintBlock
from opacus_dmaudit.assets.data import (
    load_cifar10_test,
    load_mnist_idx,
    mnist_5k_split,
    natural_patches,
)
from opacus_dmaudit.assets.models import small_cnn

ROOT = Path(__file__).resolve().parents[1]  # the checkout (its examples/)
#: ``None``: no block; otherwise the block's gradient_scale α.
CONFIGS = (None, 1.0, 10.0, 100.0)
#: CIFAR-10: the first this many of the 1017 shared images train, the rest (200) are the test set.
CIFAR_TRAIN = 817


def _label(alpha: float | None) -> str:
    return "no block" if alpha is None else f"block, α = {alpha:g}"


def load(dataset: str, *, n_test: int | None = None) -> dict:
    """Training, test and public (calibration) images with labels, and the model factory."""
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is missing: the benchmark needs the real test sets")
    if dataset == "mnist":
        split = mnist_5k_split()
        test_x, test_y = load_mnist_idx(
            shared / "mnist" / "t10k-images-idx3-ubyte.gz",
            shared / "mnist" / "t10k-labels-idx1-ubyte.gz",
        )
        n = n_test or len(test_x)
        return {
            "train": split["prior"],
            "test": (test_x[:n], test_y[:n]),
            "public": split["private"][0],
            "model": lambda width: small_cnn(1, 28),
            "batch_size": 128,
            "lr": 0.5,
            "momentum": 0.0,
        }
    example = runpy.run_path(str(ROOT / "examples" / "cifar10_resnet9.py"))
    images, labels = load_cifar10_test(shared / "cifar10" / "cifar10_test_first1017.npz")
    public = torch.from_numpy(natural_patches(count=2000, seed=1)).permute(0, 3, 1, 2) / 255.0

    def model(width: int) -> nn.Module:
        norm = example["Normalize"](example["CIFAR_MEAN"], example["CIFAR_STD"])
        return nn.Sequential(norm, example["resnet9"](width=width))

    n_train = CIFAR_TRAIN
    n = min(n_test or len(images) - n_train, len(images) - n_train)
    return {
        "train": (images[:n_train], labels[:n_train]),
        "test": (images[n_train : n_train + n], labels[n_train : n_train + n]),
        "public": public.float(),
        "model": model,
        "batch_size": 128,
        "lr": 0.05,
        "momentum": 0.9,
    }


def imprint_share(model: nn.Module, block: ImprintBlock | None, x, y) -> float | None:
    """Median over samples of the imprint parameters' share of the squared per-sample norm."""
    if block is None:
        return None
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    imprint = {id(block.imprint.weight), id(block.imprint.bias)}
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    part = torch.zeros_like(total)
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        sq = gs.reshape(gs.shape[0], -1).double().square().sum(dim=1)
        total += sq
        if id(p) in imprint:
            part += sq
        p.grad_sample = None
    model.zero_grad(set_to_none=True)
    return float((part / total.clamp_min(1e-30)).median())


def train_one(
    data: dict, *, alpha, seed: int, epochs: float, width: int, sigma: float, share_samples: int
) -> dict:
    """One DP-SGD run: test accuracy, the accountant and the imprint's share of the gradient norm."""
    torch.manual_seed(seed)
    x, y = data["train"]
    block = None
    body = data["model"](width)
    if alpha is None:
        model = body
    else:
        block = ImprintBlock(
            image_shape=tuple(x.shape[1:]), num_bins=128, gradient_scale=alpha
        ).calibrate(data["public"])
        model = nn.Sequential(block, body)
    engine = PrivacyEngine(accountant="rdp")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=data["batch_size"]
    )
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=data["lr"], momentum=data["momentum"]),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(seed + 1000),
    )
    steps = max(1, round(epochs * len(loader)))
    start, done = time.perf_counter(), 0
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    seconds = time.perf_counter() - start
    opt.zero_grad()
    # a random subset of the training images (MNIST-5k is sorted by class), from its own generator
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:share_samples]
    share = imprint_share(model, block, x[pick], y[pick])
    model.eval()
    test_x, test_y = data["test"]
    with torch.no_grad():
        pred = torch.cat([model(test_x[i : i + 500]).argmax(1) for i in range(0, len(test_x), 500)])
    return {
        "accuracy": float((pred == test_y).float().mean()),
        "accountant": engine.accountant,
        "share": share,
        "steps": steps,
        "seconds": seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--datasets", nargs="+", choices=("mnist", "cifar10"))
    parser.add_argument("--seeds", type=int, nargs=2, metavar=("MNIST", "CIFAR10"))
    parser.add_argument("--epochs", type=float, nargs=2, metavar=("MNIST", "CIFAR10"))
    parser.add_argument("--width", type=int, help="ResNet-9 base width (CIFAR-10)")
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for message in (
        "Full backward hook",
        "Secure RNG",
        "Optimal order",
        "Using a non-full backward",
    ):
        warnings.filterwarnings("ignore", message=f".*{message}.*")
    datasets = args.datasets or ("mnist", "cifar10")
    seeds = dict(zip(("mnist", "cifar10"), args.seeds or ((3, 2) if args.full else (1, 1))))
    epochs = dict(
        zip(("mnist", "cifar10"), args.epochs or ((8, 12) if args.full else (0.125, 0.15)))
    )
    width = args.width or 8  # per-sample gradients of a ResNet-9: ~3 s a step at width 8 here
    n_test = None if args.full else 300
    share_samples = 256 if args.full else 64
    print(
        f"σ = {args.sigma}, C = 1, Poisson sampling, seeds {seeds}, epochs {epochs}, "
        f"ResNet-9 width {width}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    results: dict[str, dict] = {}
    for name in datasets:
        data = load(name, n_test=n_test)
        print(
            f"{name}: {len(data['train'][0])} training images, {len(data['test'][0])} test "
            f"images, {len(data['public'])} public calibration images",
            flush=True,
        )
        runs: dict = {alpha: [] for alpha in CONFIGS}
        # Seed-major: every configuration sees the same seeds (model initialisation, Poisson
        # batches) side by side, and an interrupted run still holds whole seeds.
        for seed in range(seeds[name]):
            for alpha in CONFIGS:
                r = train_one(
                    data,
                    alpha=alpha,
                    seed=seed,
                    epochs=epochs[name],
                    width=width,
                    sigma=args.sigma,
                    share_samples=share_samples,
                )
                runs[alpha].append(r)
                share = "-" if r["share"] is None else f"{r['share']:.3f}"
                print(
                    f"  run {name} seed {seed} {_label(alpha):<16} accuracy {r['accuracy']:.3f} "
                    f"share {share} steps {r['steps']} {r['seconds']:.0f} s",
                    flush=True,
                )
        results[name] = runs
    print(
        f"{'data':<8} {'configuration':<16} {'accuracy (mean ± std)':>22} {'per seed':>24} "
        f"{'vs no block (paired)':>21} {'imprint share':>14} {'ε':>6} {'steps':>6} {'s/run':>6}"
    )
    for name, runs in results.items():
        base = [r["accuracy"] for r in runs[None]]
        # same σ, q and number of steps in every run of a data set: one ε (δ = 1e-5) for all
        epsilon = runs[None][0]["accountant"].get_epsilon(1e-5)
        for alpha in CONFIGS:
            acc = [r["accuracy"] for r in runs[alpha]]
            mean = statistics.mean(acc)
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            if alpha is None:
                delta = "-"
            else:
                diffs = [a - b for a, b in zip(acc, base, strict=True)]
                dsd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                delta = f"{statistics.mean(diffs):+.3f} ± {dsd:.3f}"
            shares = [r["share"] for r in runs[alpha] if r["share"] is not None]
            share = f"{statistics.mean(shares):.3f}" if shares else "-"
            print(
                f"{name:<8} {_label(alpha):<16} {mean:>15.3f} ± {sd:.3f} "
                f"{' '.join(f'{a:.3f}' for a in acc):>24} {delta:>21} {share:>14} "
                f"{epsilon:>6.2f} {runs[alpha][0]['steps']:>6} "
                f"{statistics.mean(r['seconds'] for r in runs[alpha]):>6.0f}"
            )
    print(
        "(accuracy on held-out test images never used in training or calibration; std over "
        "seeds; vs no block: mean ± std over seeds of the accuracy difference to the no-block "
        "run with the same seed (same initialisation and Poisson batches); imprint share: median "
        f"over {share_samples} random training samples of the block's share of the squared per-sample gradient norm "
        "before clipping, after training, mean over seeds; s/run: training seconds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
