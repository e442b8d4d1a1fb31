"""Does the prior fit the data? The auditor's prior-fit check on real image sets, and grey input.

    python benchmarks/prior_fit.py            # quick: 2 sets, 4 images per level
    python benchmarks/prior_fit.py --full     # 5 sets, 10 images per level, grey mapping on 48 (~25 min)

Table 1 runs :func:`opacus_dmaudit.prior_fit.public_fit` (what ``DMAuditor`` runs at attach on
its public images) on real image sets with the embedded priors: each set's images with Gaussian
noise of std 0.1 / 0.2 / 0.4, restored by the prior (the auditor's sampler: DDIM, at most 20
steps of at least 20 timesteps) and by the best classical denoiser (TV, wavelet, NLM; knobs
tuned for MSE on other images of the set), MSE and LPIPS-VGG per level, and the check's verdict
(faithful: the prior wins at both; loses; hallucination: worse MSE, better LPIPS). Sets: MNIST-5k
digits and scikit-learn's 8×8 digits (upsampled to 28×28) through ``embedded:mnist``; CIFAR-10
test images through ``embedded:natural``; the same images in grey through both priors.

Table 2: grey images through a colour prior. The grey channel is replicated into three; its
noise then sits in all three channels alike. Asked to remove noise of std s (naive) the prior
under-denoises; the luminance noise of std s is what independent noise of std s·√3 leaves after
averaging three channels, so the library asks for s·√3. Grey CIFAR-10 test images through
``embedded:natural``, MSE and LPIPS of the channel-averaged output.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from common import shared_data_dir

from opacus_dmaudit import DiffusionPrior
from opacus_dmaudit.assets.data import load_cifar10_test, mnist_5k_split
from opacus_dmaudit.checks.prior_fit import FIT_LEVELS, public_fit
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.score.metrics import LPIPS, mse


def grey(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]


def sklearn_digits(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[:n]).float()[:, None] / 16
    return F.interpolate(x, size=(28, 28), mode="bilinear").clamp(0, 1)


def image_sets(full: bool) -> list[tuple[str, str, torch.Tensor]]:
    """``(set, prior, images)``: public images only, never the ones the demo audits."""
    n = 64
    sets = [
        ("MNIST-5k digits", "embedded:mnist", mnist_5k_split()["prior"][0][:n]),
        ("sklearn 8x8 digits", "embedded:mnist", sklearn_digits(n)),
    ]
    shared = shared_data_dir()
    if full and shared is not None:
        cifar, _ = load_cifar10_test(shared / "cifar10" / "cifar10_test_first1017.npz")
        cifar = cifar[:n]
        sets += [
            ("CIFAR-10", "embedded:natural", cifar),
            ("CIFAR-10 grey", "embedded:natural", grey(cifar)),
            ("CIFAR-10 grey", "embedded:mnist", grey(cifar)),
        ]
    return sets


def fit_table(args, lpips: LPIPS) -> None:
    config = AuditConfig()
    priors: dict[str, DiffusionPrior] = {}
    print(
        f"prior fit on public images ({args.images} scored per level, noise std "
        f"{', '.join(f'{lv:g}' for lv in FIT_LEVELS)}; prior: DDIM <= 20 steps, stride >= 20)"
    )
    print(
        f"{'images':<20} {'prior':<17} {'std':>5} {'MSE prior':>10} {'MSE class.':>11} "
        f"{'LPIPS prior':>12} {'LPIPS class.':>13}  verdict"
    )
    for name, prior_name, images in image_sets(args.full):
        prior = priors.setdefault(prior_name, DiffusionPrior.from_pretrained(prior_name))
        start = time.perf_counter()
        check = public_fit(
            images,
            prior,
            config=config,
            lpips=lpips,
            generator=torch.Generator().manual_seed(args.seed),
            images=args.images,
        ).check
        seconds = time.perf_counter() - start
        for i, level in enumerate(check["levels"]):
            print(
                f"{name:<20} {prior_name:<17} {level:>5g} {check['mse_dm'][i]:>10.4f} "
                f"{check['mse_classical'][i]:>11.4f} {check['lpips_dm'][i]:>12.3f} "
                f"{check['lpips_classical'][i]:>13.3f}  {check['verdicts'][i]}"
            )
        print(f"{'':<20} check: {check['status']} ({seconds:.1f} s)")


def grey_table(args, lpips: LPIPS) -> None:
    shared = shared_data_dir()
    if shared is None:
        print("grey mapping: ../shared/data is missing (CIFAR-10), skipped")
        return
    cifar, _ = load_cifar10_test(shared / "cifar10" / "cifar10_test_first1017.npz")
    x = grey(cifar[100 : 100 + args.grey_images])
    prior = DiffusionPrior.from_pretrained("embedded:natural")
    gen = torch.Generator().manual_seed(args.seed)
    print(
        f"grey CIFAR-10 through embedded:natural ({x.shape[0]} images; DDIM <= 20 steps of >= 10 "
        "timesteps; the output's channel mean)"
    )
    print(f"{'std':>5} {'method':<26} {'MSE':>8} {'LPIPS':>7}")
    for s in (0.1, 0.2, 0.4):
        y = x + s * torch.randn(x.shape, generator=gen)
        rgb = y.expand(-1, 3, -1, -1)
        rows = {
            "raw": y.clamp(0, 1),
            "replicate, told s (naive)": prior.denoise(rgb, noise_std=s).mean(1, keepdim=True),
            "replicate, told s·√3": prior.denoise(rgb, noise_std=s * math.sqrt(3)).mean(
                1, keepdim=True
            ),
            "denoise(grey) (the library)": prior.denoise(y, noise_std=s),
        }
        for method, out in rows.items():
            print(
                f"{s:>5g} {method:<26} {float(mse(out, x).mean()):>8.4f} "
                f"{float(lpips(out, x).mean()):>7.3f}"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--images", type=int, help="images scored per level")
    parser.add_argument("--grey-images", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.images = args.images or (10 if args.full else 4)
    args.grey_images = args.grey_images or (48 if args.full else 8)
    torch.set_num_threads(2)
    lpips = LPIPS()
    fit_table(args, lpips)
    grey_table(args, lpips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
