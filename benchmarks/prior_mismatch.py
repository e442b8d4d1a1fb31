"""Priors matter: in-domain against out-of-domain diffusion priors on the same DP-SGD readouts.

    python benchmarks/prior_mismatch.py           # quick smoke run: 32 images per set, one σ
    python benchmarks/prior_mismatch.py --full    # 640 MNIST test digits, 1017 CIFAR-10 images

The paper's first finding: what an adversary recovers depends on how well its prior matches the
data. Two priors made by ``dmaudit train-prior`` on data never audited here:

* ``embedded:mnist``: MNIST-5k training digits (``--data mnist5k-prior``);
* ``embedded:natural``: 32x32 multi-scale patches of the colour photos bundled with
  scikit-image and scikit-learn (``--data natural-patches``); no CIFAR-10 image.

Both denoise the *same* readouts (real images through one real Opacus step, read by the
auditor's scoring stage as in ``quality_vs_noise.py``) with DDIM-20 at each readout's predicted
noise std. Digits go to the natural prior zero-padded to 32x32 and grey -> RGB; CIFAR-10 images go
to the digit prior as their grey mean (noise std / √3), which loses their colour. So that the
colour loss is not counted as prior mismatch, CIFAR-10 gets a grey in-domain control: the natural
prior given the same grey mean (grey -> RGB, its output's channel mean back). The gap is
out-of-domain minus in-domain on the same input (LPIPS: positive means the wrong prior does
worse); for CIFAR-10 both against the grey control and, for reference, the colour one.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F
from common import finite_std, load_dataset, opacus_readouts

from opacus_dmaudit.reconstruct.prior import DiffusionPrior
from opacus_dmaudit.score.metrics import LPIPS, mse, ssim

GRID = {"mnist": (0.003, 0.01, 0.03, 0.1), "cifar10": (0.001, 0.003, 0.01, 0.03)}
GREY = "natural prior, grey input"


def denoise_with(
    prior: DiffusionPrior, raw: torch.Tensor, std: torch.Tensor, seed: int, *, grey: bool = False
):
    """DDIM-20 with ``prior``, mapping images to its domain and back (see the module doc).

    ``grey``: give colour readouts to the prior as their grey mean (what the digit prior must get),
    whatever the prior's channels; the output is grey too (its channel mean, on every channel).
    """
    c, h, w = raw.shape[1:]
    pc = prior.model_shape[0]
    gen = torch.Generator().manual_seed(seed)
    x, s = raw, std
    if c == 3 and (pc == 1 or grey):  # colour images: the grey mean
        x, s = raw.mean(dim=1, keepdim=True), std / math.sqrt(3)
    pad = (prior.model_shape[1] - h) // 2 if pc == 3 and c == 1 else 0
    if pad:  # digits, natural prior: zero-pad to 32x32 (black background)
        x = F.pad(x, (pad, pad, pad, pad))
    if pc == 3 and x.shape[1] == 1:  # grey -> RGB
        x = x.expand(-1, 3, -1, -1)
    out = prior.denoise(x, noise_std=s, sampler="ddim", steps=20, generator=gen)
    if pad:
        out = out[:, :, pad : pad + h, pad : pad + w]
    if grey or c == 1:
        out = out.mean(dim=1, keepdim=True)
    if out.shape[1] != c:
        out = out.expand(-1, c, -1, -1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--mnist-prior", default="embedded:mnist")
    ap.add_argument("--natural-prior", default="embedded:natural")
    ap.add_argument("--n", type=int)
    ap.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    priors = {
        "mnist prior": DiffusionPrior.from_pretrained(args.mnist_prior, resize=True),
        "natural prior": DiffusionPrior.from_pretrained(args.natural_prior, resize=True),
    }
    in_domain = {"mnist": "mnist prior", "cifar10": "natural prior"}
    lpips = LPIPS()
    print(f"{'data':<8} {'σ':>7} {'std':>6} {'prior':<26} {'MSE':>7} {'SSIM':>6} {'LPIPS':>6}")
    gaps = []
    for name in args.datasets:
        n = args.n or ((640 if name == "mnist" else 1017) if args.full else 32)
        images, public = load_dataset(name, n)
        for sigma in GRID[name] if args.full else GRID[name][1:2]:
            ro = opacus_readouts(images, public, sigma=sigma, seed=args.seed)
            truth, raw, std = ro["truth"], ro["raw"], finite_std(ro["std"])
            rows = {"raw readout": raw.clamp(0, 1)}
            for label, prior in priors.items():
                rows[label] = denoise_with(prior, raw, std, args.seed)
            if name == "cifar10":  # the in-domain prior on the grey input the digit prior gets
                rows[GREY] = denoise_with(priors["natural prior"], raw, std, args.seed, grey=True)
            scores = {}
            for label, img in rows.items():
                scores[label] = (
                    float(mse(img, truth).mean()),
                    float(ssim(img, truth).mean()),
                    float(lpips(img, truth).mean()),
                )
                head = f"{name:<8} {sigma:>7g} {float(std.median()):>6.3g}"
                m, s_, l_ = scores[label]
                print(f"{head} {label:<26} {m:7.4f} {s_:6.3f} {l_:6.3f}")
            good = in_domain[name]
            bad = next(k for k in priors if k != good)
            if name == "cifar10":  # like with like: both priors on the grey input
                gaps.append((name, sigma, "grey input", scores[GREY], scores[bad]))
            gaps.append((name, sigma, "as given", scores[good], scores[bad]))
    print("\ngap, out-of-domain minus in-domain prior (LPIPS, SSIM):")
    for name, sigma, control, good, bad in gaps:
        print(
            f"  {name:<8} σ={sigma:<7g} {control:<10} LPIPS {bad[2] - good[2]:+.3f}  "
            f"SSIM {bad[1] - good[1]:+.3f}  (in-domain LPIPS {good[2]:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
