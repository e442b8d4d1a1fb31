"""Priors matter: in-domain against out-of-domain diffusion priors on the same DP-SGD readouts.

    python benchmarks/prior_mismatch.py           # quick smoke run: 32 images per set, one σ
    python benchmarks/prior_mismatch.py --full    # 640 MNIST test digits, 1017 CIFAR-10 images

The paper's first finding: what an adversary recovers depends on how well its prior matches the
data. Two priors made by ``dmaudit train-prior`` on data never audited here:

* ``embedded:mnist``: MNIST-5k training digits (``--data mnist5k-prior``);
* ``embedded:natural``: 32x32 multi-scale patches of the colour photos bundled with
  scikit-image and scikit-learn (``--data natural-patches``); no CIFAR-10 image.

Both denoise the *same* readouts (real images through one real Opacus step, as in
``quality_vs_noise.py``) with DDIM-20 at each readout's predicted noise std. Digits go to the
natural prior zero-padded to 32x32 and grey -> RGB; CIFAR-10 images go to the digit prior as
their grey mean (noise std / √3). The gap is out-of-domain minus in-domain (LPIPS: positive means
the wrong prior does worse).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finite_std, load_dataset, opacus_readouts  # noqa: E402

from opacus_dmaudit.metrics import LPIPS, mse, ssim  # noqa: E402
from opacus_dmaudit.prior import DiffusionPrior  # noqa: E402

GRID = {"mnist": (0.003, 0.01, 0.03, 0.1), "cifar10": (0.001, 0.003, 0.01, 0.03)}


def denoise_with(prior: DiffusionPrior, raw: torch.Tensor, std: torch.Tensor, seed: int):
    """DDIM-20 with ``prior``, mapping images to its domain and back (see the module doc)."""
    c, h, w = raw.shape[1:]
    pc = prior.model_shape[0]
    gen = torch.Generator().manual_seed(seed)
    x, s = raw, std
    if c == 3 and pc == 1:  # colour images, digit prior: the grey mean
        x, s = raw.mean(dim=1, keepdim=True), std / math.sqrt(3)
    pad = (prior.model_shape[1] - h) // 2 if pc == 3 and c == 1 else 0
    if pad:  # digits, natural prior: zero-pad to 32x32 (black background), grey -> RGB
        x = F.pad(x, (pad, pad, pad, pad)).expand(-1, 3, -1, -1)
    out = prior.denoise(x, noise_std=s, sampler="ddim", steps=20, generator=gen)
    if pad:
        out = out[:, :, pad : pad + h, pad : pad + w].mean(dim=1, keepdim=True)
    if out.shape[1] != c:
        out = out.expand(-1, c, -1, -1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--mnist-prior", default="embedded:mnist")
    ap.add_argument("--natural-prior", default="embedded:natural")
    ap.add_argument("--n", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    priors = {
        "mnist prior": DiffusionPrior.from_pretrained(args.mnist_prior, resize=True),
        "natural prior": DiffusionPrior.from_pretrained(args.natural_prior, resize=True),
    }
    in_domain = {"mnist": "mnist prior", "cifar10": "natural prior"}
    lpips = LPIPS()
    print(f"{'data':<8} {'σ':>7} {'std':>6} {'prior':<14} {'MSE':>7} {'SSIM':>6} {'LPIPS':>6}")
    gaps = []
    for name in ("mnist", "cifar10"):
        n = args.n or ((640 if name == "mnist" else 1017) if args.full else 32)
        images, public = load_dataset(name, n)
        for sigma in GRID[name] if args.full else GRID[name][1:2]:
            ro = opacus_readouts(images, public, sigma=sigma, seed=args.seed)
            truth, raw, std = ro["truth"], ro["raw"], finite_std(ro["std"])
            rows = {"raw readout": raw.clamp(0, 1)}
            for label, prior in priors.items():
                rows[label] = denoise_with(prior, raw, std, args.seed)
            scores = {}
            for label, img in rows.items():
                scores[label] = (
                    float(mse(img, truth).mean()),
                    float(ssim(img, truth).mean()),
                    float(lpips(img, truth).mean()),
                )
                head = f"{name:<8} {sigma:>7g} {float(std.median()):>6.3g}"
                m, s_, l_ = scores[label]
                print(f"{head} {label:<14} {m:7.4f} {s_:6.3f} {l_:6.3f}")
            good = in_domain[name]
            bad = next(k for k in priors if k != good)
            gaps.append((name, sigma, scores[good], scores[bad]))
    print("\ngap, out-of-domain minus in-domain prior (LPIPS, SSIM):")
    for name, sigma, good, bad in gaps:
        print(
            f"  {name:<8} σ={sigma:<7g} LPIPS {bad[2] - good[2]:+.3f}  SSIM {bad[1] - good[1]:+.3f}"
            f"  (in-domain LPIPS {good[2]:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
