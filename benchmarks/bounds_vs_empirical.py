"""Bounds against evidence: one step's ReRo bound next to what attackers with and without a prior do.

    python benchmarks/bounds_vs_empirical.py          # quick: 32 images per set, three σ
    python benchmarks/bounds_vs_empirical.py --full   # 256 MNIST test digits, 256 CIFAR-10 (~25 min on 2 cores)
    python benchmarks/bounds_vs_empirical.py --metric ssim --threshold 0.8   # another criterion

The paper's second finding, in both directions. Every image here is in exactly one DP-SGD step (one
Gaussian mechanism, µ = 1/σ, fixed batches of 64), so the bound on *any* attacker's success on it
is the one-step bound Φ(Φ⁻¹(κ) + µ), with κ the success of the best guess made without the gradient
*at the same criterion*. Two attackers read the same readouts (the auditor's own scoring stage:
``read_step``, ``match_readouts``, predicted noise std):

* **raw**: no prior, the privatised readout itself;
* **DM**: the readout denoised by the diffusion prior with the auditor's default sampler (DDIM-20
  at stride 20): ``embedded:mnist`` for digits, ``embedded:natural`` (photo patches) for CIFAR-10.

Both are scored on every image alone in its bin (an attacker may try every bin); "audit" counts
only the images the auditor's occupancy test finds (what a record's success rate counts).

Two criteria, each with its own κ, both the auditor's own (``AuditConfig``'s success criterion,
``schema.meets``, ``score.metrics.pairwise``/``identified``, ``privacy.bounds.step_bounds``):

* **LPIPS ≤ 0.1** (the auditor's default; ``--metric``/``--threshold`` configure another).
  κ is the auditor's: the one-sided 95 % upper limit of the success baseline measured by
  :func:`opacus_dmaudit.score.baseline.estimate_baselines` on *public* images (MNIST-5k training
  digits; natural-image patches) with the same prior and the readouts' bins (fixed guesses chosen
  on one half and scored on the other, and guesses that know the bin). "fixed" is a real constant
  attacker: κ̂'s best guess scored against the evaluated images (it never saw them). The
  κ = 1/N bound (N the images the batches are drawn from) is shown too: where "fixed" beats it,
  that bound was wrong.
* **identification**: a reconstruction succeeds when it is nearer (in the success metric, LPIPS by
  default) to its own image than to the 63 other images of its batch. κ is not 1/64: the
  informed adversary of the ReRo theorem (it knows the other 63 images) does better without the
  gradient; its upper limit, measured on public batches of 64, is the bound's κ, as the auditor's.

Reading: the gap between "raw" and the bound is what the bound overstates for an attacker without
a prior; the share of it the DM closes is what the prior adds. A rate above its bound would mean a
wrong κ (or a bug): the script flags it.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import PRIORS, finite_std, load_dataset, opacus_readouts

from opacus_dmaudit.capture.imprint import ImprintBlock
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.privacy.bounds import rero_gaussian, step_bounds
from opacus_dmaudit.reconstruct.prior import DiffusionPrior
from opacus_dmaudit.schema import METRICS, meets
from opacus_dmaudit.score.baseline import estimate_baselines
from opacus_dmaudit.score.metrics import LPIPS, identified, pairwise

#: From "everything visible" to "one step's bound is small".
FULL = {
    "mnist": (0.01, 0.03, 0.1, 0.3, 1.0, 2.0),
    "cifar10": (0.003, 0.01, 0.03, 0.3, 1.0),
}
QUICK = {"mnist": (0.03, 1.0), "cifar10": (0.01,)}
#: The readouts' imprint block and batches (``common.opacus_readouts``' defaults).
NUM_BINS, BATCH = 512, 64


def criterion_text(config: AuditConfig, *, net: bool = False) -> str:
    """The configured success criterion as the tables show it (``"LPIPS <= 0.1"``); ``net``:
    with the LPIPS backbone (``"LPIPS-VGG <= 0.1"``)."""
    crit = config.success_criterion
    label = METRICS[crit.metric].label
    if net and crit.metric == "lpips":
        label += f"-{config.lpips_net.upper()}"
    sign = ">=" if crit.higher_is_better else "<="
    return f"{label} {sign} {crit.threshold:g}"


def succeeded(values: torch.Tensor, config: AuditConfig) -> torch.Tensor:
    """Per score, whether it meets the configured success criterion (:func:`schema.meets`)."""
    hits = [meets(config.success_metric, v, config.success_threshold) for v in values.tolist()]
    return torch.tensor(hits, dtype=torch.bool)


def evaluate(name: str, sigma: float, images, public, prior, lpips, config, seed: int) -> dict:
    """Success and identification of raw and DM reconstructions of one σ's readouts."""
    ro = opacus_readouts(images, public, sigma=sigma, seed=seed, config=config)
    truth, std = ro["truth"], finite_std(ro["std"])
    raw = ro["raw"].clamp(0, 1)
    dm = prior.denoise(
        ro["raw"],
        noise_std=std,
        sampler=config.sampler,
        steps=config.sampler_steps,
        min_stride=config.sampler_min_stride,
        generator=torch.Generator().manual_seed(seed),
    )
    # the success metric (LPIPS by default) of every reconstruction against every image of its
    # batch: the entry at its own image is its score against the truth; the row says whether it
    # singles that image out
    scores = {
        s: torch.full((len(truth),), float("nan"), dtype=torch.float64) for s in ("raw", "dm")
    }
    ident = {s: torch.zeros(len(truth), dtype=torch.bool) for s in ("raw", "dm")}
    for k, candidates in enumerate(ro["batches"]):
        rows = (ro["batch"] == k).nonzero().flatten()
        if not rows.numel():
            continue
        m, own = rows.numel(), ro["own"][rows].tolist()
        recon = torch.cat([raw[rows], dm[rows]])
        d = pairwise(config.success_metric, recon, candidates, lpips=lpips)
        hit = identified(d, own * 2, higher_is_better=config.success_criterion.higher_is_better)
        mine = d[torch.arange(2 * m), torch.tensor(own * 2)]
        scores["raw"][rows], scores["dm"][rows] = mine[:m], mine[m:]
        ident["raw"][rows], ident["dm"][rows] = hit[:m], hit[m:]
    return {
        "dataset": name,
        "sigma": sigma,
        "mu": ro["mu"],
        "lone": len(truth),
        "found": ro["found"],
        "success": {s: succeeded(v, config) for s, v in scores.items()},
        "identified": ident,
        "candidates": min(len(b) for b in ro["batches"]),
        "total": ro["total"],
    }


def rate(mask: torch.Tensor) -> float:
    return float(mask.double().mean()) if mask.numel() else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--n", type=int, help="images per set (full: 256 each)")
    ap.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metric", help="success metric (default: the auditor's, LPIPS)")
    ap.add_argument("--threshold", type=float, help="success threshold (default: the metric's)")
    args = ap.parse_args()
    # the auditor's defaults: LPIPS ≤ 0.1, DDIM-20 at stride 20 (or the criterion asked for)
    config = AuditConfig(success_metric=args.metric, success_threshold=args.threshold)
    metric = config.success_metric
    lpips = LPIPS(net=config.lpips_net) if metric == "lpips" else None
    print(
        f"criterion {criterion_text(config, net=True)}; DM: {config.sampler.name}-"
        f"{config.sampler_steps} at stride {config.sampler_min_stride}; occupancy test: the "
        "auditor's default"
    )
    for name in args.datasets:
        n = args.n or (256 if args.full else 32)
        images, public = load_dataset(name, n)
        prior = DiffusionPrior.from_pretrained(PRIORS[name])
        t0 = time.perf_counter()
        # a random sample of the public images, as ImprintBlock.calibrate keeps for the auditor
        # (the MNIST-5k split is sorted by class: its first images are all zeros)
        keep = torch.randperm(len(public), generator=torch.Generator().manual_seed(args.seed))
        # the readouts' bins (opacus_readouts' block, calibrated alike): the bin-knowing guesses
        bins = ImprintBlock(image_shape=tuple(images.shape[1:]), num_bins=NUM_BINS)
        baselines = estimate_baselines(
            public[keep[:512]],
            metric=metric,
            threshold=config.success_threshold,
            metrics=(metric,),
            batch_size=BATCH,
            geometry=bins.calibrate(public).geometry(),
            lpips=lpips,
            prior=prior,
            seed=args.seed,
            # the auditor's defaults in full mode; fewer in the quick smoke run
            **({} if args.full else {"max_images": 64}),
        )
        base = baselines.success
        informed = baselines.identification["mse" if metric == "psnr" else metric].informed_upper
        fixed = rate(succeeded(pairwise(metric, base.guess, images, lpips=lpips).flatten(), config))
        kappa_n = 1.0 / n
        kappa = base.kappa_upper
        print(
            f"\n{name}: {n} images, prior {prior.source}; κ̂ = {base.kappa:.3f} from "
            f"{base.candidates} guesses on {base.targets} public images (best: {base.best}); "
            f"that guess meets the criterion for {fixed:.3f} of the evaluated images "
            f"[{time.perf_counter() - t0:.0f} s]\n"
            f"{criterion_text(config)}: κ = upper limit of the held-out baselines = {kappa:.3f} "
            f"(κ̂ = {base.kappa:.3f}; 1/N = {kappa_n:.2g}); identification: κ = the informed "
            f"adversary's upper limit = {informed:.3f} (1/{BATCH} = {1 / BATCH:.3f})",
            flush=True,
        )
        print(header(config), flush=True)
        rows = []
        for sigma in FULL[name] if args.full else QUICK[name]:
            t0 = time.perf_counter()
            r = evaluate(name, sigma, images, public, prior, lpips, config, args.seed)
            r.update(kappa=kappa, kappa_n=kappa_n, kappa_id=informed, fixed=fixed)
            rows.append(r)
            print(row_text(r), flush=True)
            print(f"  [σ={sigma:g}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
        print("reading:")
        for r in rows:
            print(f"  σ={r['sigma']:<6g} {readings(r, config)}")
    return 0


def header(config: AuditConfig) -> str:
    return (
        f"{'':35}|{criterion_text(config):^36}|{'identification':^29}\n"
        f"{'data':<8} {'σ':>6} {'µ':>6} {'lone':>5} {'found':>6} |"
        f"{'raw':>6} {'DM':>6} {'audit':>6} {'bound':>6} {'κ=1/N':>7} |"
        f"{'raw':>6} {'DM':>6} {'audit':>6} {'bound':>6}"
    )


def bounds(r: dict) -> tuple[float, float, float]:
    """The auditor's one-step bounds at κ, at κ = 1/N and for identification (κ = the informed
    adversary's upper limit, as the auditor's ``single_step_identification``)."""
    at_kappa = step_bounds(noise_multiplier=r["sigma"], kappa=r["kappa"])
    at_n = step_bounds(noise_multiplier=r["sigma"], kappa=r["kappa_n"])
    mu = 1.0 / r["sigma"] if r["sigma"] > 0 else float("inf")
    return at_kappa["single_step"], at_n["single_step"], rero_gaussian(mu, r["kappa_id"])


def _rates(r: dict, key: str) -> tuple[float, float, float]:
    return rate(r[key]["raw"]), rate(r[key]["dm"]), rate(r[key]["dm"] & r["found"])


def row_text(r: dict) -> str:
    raw, dm, audit = _rates(r, "success")
    iraw, idm, iaudit = _rates(r, "identified")
    bound, bound_n, ibound = bounds(r)
    return (
        f"{r['dataset']:<8} {r['sigma']:>6g} {r['mu']:>6.3g} {r['lone']:>5d} "
        f"{rate(r['found']):>6.2f} |"
        f"{raw:>6.3f} {dm:>6.3f} {audit:>6.3f} {bound:>6.3f} {bound_n:>7.3f} |"
        f"{iraw:>6.3f} {idm:>6.3f} {iaudit:>6.3f} {ibound:>6.3f}"
    )


def readings(r: dict, config: AuditConfig) -> str:
    raw, dm, _ = _rates(r, "success")
    iraw, idm, _ = _rates(r, "identified")
    bound, bound_n, ibound = bounds(r)
    crit = reading(raw, dm, bound, r["fixed"], bound_n)
    ident = reading(iraw, idm, ibound)
    return f"{METRICS[config.success_metric].label}: {crit} | identification: {ident}"


def reading(raw: float, dm: float, bound: float, fixed=None, bound_n=None) -> str:
    """One phrase per row: which way the bound and the evidence part."""
    parts = []
    if max(raw, dm) > bound + 1e-9:
        parts.append("RATE ABOVE BOUND (κ too small?)")
    elif raw >= 0.95 * bound:
        parts.append("bound reached without a prior")
    else:
        closed = (dm - raw) / (bound - raw)
        parts.append(f"raw {bound - raw:.2f} below bound; DM closes {closed:.0%} of it")
    if fixed is not None and bound_n is not None and fixed > bound_n + 1e-9:
        parts.append("a fixed guess beats the κ=1/N bound")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
