"""Bounds against evidence: ReRo bounds next to the measured reconstruction success.

    python benchmarks/bounds_vs_empirical.py          # quick smoke run (computes its own scores)
    python benchmarks/bounds_vs_empirical.py --full   # reads quality_vs_noise.py --full's scores

The paper's second finding: reconstruction-robustness (ReRo) bounds and what an adversary with a
good prior achieves can be far apart. Each image here is in exactly one DP-SGD step (one Gaussian
mechanism, µ = 1/σ), so the tight bound on any adversary's success probability is
Φ(Φ⁻¹(κ) + µ) for a baseline κ (the success possible without the gradient). Two baselines:

* κ = 1/N, the auditor's default (guess which of the N training images it is);
* κ̂ = the measured success of the prior alone: one unconditional prior sample per image, scored
  against it (what the prior gives away with no gradient at all).

Success is LPIPS-VGG ≤ 0.1 against the real image (the auditor's default: close to the image) and
≤ 0.3 (looser: the right kind of image), over the images alone in their bin; "DM∧found" also
requires the auditor's occupancy test (z > 4) to fire. The full mode takes quality_vs_noise's
scores and adds larger σ (``EXTRA``), where one step's bound drops below 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GRIDS, PRIORS, load_dataset  # noqa: E402
from quality_vs_noise import evaluate  # noqa: E402

from opacus_dmaudit.bounds import rero_gaussian  # noqa: E402
from opacus_dmaudit.metrics import LPIPS  # noqa: E402
from opacus_dmaudit.prior import DiffusionPrior  # noqa: E402

#: Noise multipliers beyond quality_vs_noise's grid, where one step's bound falls below 1.
EXTRA = {"mnist": (0.5, 1.0, 2.0), "cifar10": (0.3, 1.0)}


def prior_only_lpips(prior, truth, lpips, seed) -> torch.Tensor:
    """LPIPS of one unconditional prior sample (no gradient) per image; κ̂ = share ≤ η."""
    gen = torch.Generator().manual_seed(seed)
    samples = prior.sample(truth.shape[0], steps=50, generator=gen)
    if samples.shape[1:] != truth.shape[1:]:
        samples = prior._from_model(samples, tuple(truth.shape[1:]))
    return lpips(samples.clamp(0, 1), truth)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--scores", help="quality_vs_noise JSON (default with --full: the full one)")
    ap.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.1, 0.3], help="success: LPIPS <= each"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lpips = LPIPS()
    path = args.scores or ("benchmarks/results/quality_vs_noise.json" if args.full else None)
    if path:
        results = json.loads(Path(path).read_text())
        print(f"scores from {path}; σ {EXTRA} added here (raw and DDIM-20 only)")
        for name, sigmas in EXTRA.items():
            n = max(r["images"] for r in results if r["dataset"] == name)
            results += evaluate(
                name,
                n=n,
                sigmas=sigmas,
                prior=DiffusionPrior.from_pretrained(PRIORS[name]),
                lpips=lpips,
                ddpm_n=0,
                n_tune=0,
                samplers=(("ddim", 20),),
                classical=(),
            )
    else:
        results = []
        for name in ("mnist", "cifar10"):
            prior = DiffusionPrior.from_pretrained(PRIORS[name])
            results += evaluate(
                name,
                n=32,
                sigmas=GRIDS[name][2:4],
                prior=prior,
                lpips=lpips,
                ddpm_n=0,
                n_tune=0,
                samplers=(("ddim", 20),),
                classical=(),
            )
    baseline = {}  # per data set: LPIPS of prior-only samples against up to 256 of its images
    for name in ("mnist", "cifar10"):
        rows = [r for r in results if r["dataset"] == name]
        if rows:
            images, _ = load_dataset(name, rows[0]["images"])
            prior = DiffusionPrior.from_pretrained(PRIORS[name])
            baseline[name] = prior_only_lpips(prior, images[:256], lpips, args.seed)
    for threshold in args.thresholds:
        print(f"\nsuccess: LPIPS <= {threshold}")
        table(results, baseline, threshold)
    return 0


def table(results, baseline, threshold) -> None:
    print(
        f"{'data':<8} {'σ':>7} {'µ':>7} {'lone':>5} {'found':>6} {'raw':>6} {'DM':>6} "
        f"{'DM∧found':>8} {'κ=1/N':>8} {'bound':>7} {'κ̂ prior':>8} {'bound':>7}  reading"
    )
    for name in ("mnist", "cifar10"):
        rows = sorted((r for r in results if r["dataset"] == name), key=lambda r: r["sigma"])
        if not rows:
            continue
        kappa_hat = float((baseline[name] <= threshold).float().mean())
        kappa_n = 1.0 / rows[0]["images"]
        for r in rows:
            lone = r["singletons"]
            ok = {label: torch.tensor(s["lpips"]) <= threshold for label, s in r["scores"].items()}
            dm_key = next(k for k in r["scores"] if k.startswith("ddim"))
            raw, dm = float(ok["raw"].float().mean()), float(ok[dm_key].float().mean())
            found = torch.tensor(r["found_mask"])
            dm_found = float((ok[dm_key] & found).float().mean())
            mu = r["mu"]
            b_n = rero_gaussian(mu, kappa_n)
            b_hat = rero_gaussian(mu, kappa_hat) if kappa_hat > 0 else float("nan")
            if max(dm, raw) > b_n + 1e-9:
                reading = "the κ=1/N bound UNDERSTATES: the prior alone beats it"
            elif b_n - dm > 0.5:
                reading = "bound overstates (this adversary is far below it)"
            else:
                reading = "bound close to the evidence"
            print(
                f"{name:<8} {r['sigma']:>7g} {mu:>7.4g} {lone:>5d} {r['found'] / lone:>6.2f} "
                f"{raw:>6.2f} {dm:>6.2f} {dm_found:>8.2f} {kappa_n:>8.2g} {b_n:>7.3f} "
                f"{kappa_hat:>8.3f} {b_hat:>7.3f}  {reading}"
            )


if __name__ == "__main__":
    sys.exit(main())
