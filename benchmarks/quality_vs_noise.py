"""Reconstruction quality against DP-SGD noise, from real images through a real Opacus step.

    python benchmarks/quality_vs_noise.py            # quick smoke run: 32 images per set, one σ
    python benchmarks/quality_vs_noise.py --full     # 640 MNIST test digits, 1017 CIFAR-10 images

Each image goes through one DP-SGD step (fixed batches of 64, C = 1) of a small CNN behind a
512-bin ImprintBlock, at each noise multiplier σ of a grid from "near-perfect" to "nothing
visible". The images that fell alone in their bin are read out of the noised gradient sum and
scored (MSE, SSIM, LPIPS-VGG against the real image) as: the raw readout (clipped to [0, 1] for
scoring, as every output is), the best classical denoiser (TV, wavelet or NLM, tuned by LPIPS on
readouts of *public* images at the same σ: MNIST-5k training digits, natural-image patches), and
each sampler of the diffusion prior at the readout's predicted noise std. The classical denoisers
and the prior get the same input: the readout, not clipped. Readouts, the occupancy test, the
predicted noise std and the matching come from the auditor's own scoring stage (see ``common``).
Per σ the table gives the per-step µ = 1/σ, the exact single-step ε at δ = 1e-5 (µ-GDP), the
median predicted noise std, and how many of the lone images the auditor's occupancy test finds.

The paper's loop (Algorithm 1, ``"ddim-every-step"``: DDIM η = 0 at every timestep from t*) costs
t* model calls per image, so it runs on the first ``--paper-n`` lone images (full: 50); a second
table scores every method on those images, so that each table compares methods on the same images.
Priors: ``embedded:mnist`` for digits, ``embedded:natural`` (photo patches) for CIFAR-10.
Writes per-image scores to ``--out``/quality_vs_noise[_quick].json and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import (
    GRIDS,
    PRIORS,
    best_classical,
    finite_std,
    load_dataset,
    opacus_readouts,
)

from opacus_dmaudit.reconstruct.prior import DiffusionPrior
from opacus_dmaudit.schema import HIGHER_IS_BETTER, METRICS
from opacus_dmaudit.score.metrics import LPIPS, mse, ssim

#: (sampler, steps); the paper's loop runs on a subset (``paper_n``)
SAMPLERS = (("ddim", 20), ("posterior-mean", 1), ("ddim-every-step", 1))
PAPER = "ddim-every-step"


def evaluate(
    dataset: str,
    *,
    n: int,
    sigmas,
    prior: DiffusionPrior,
    lpips: LPIPS,
    paper_n: int,
    n_tune: int,
    samplers=SAMPLERS,
    classical=("tv", "wavelet", "nlm"),
    seed: int = 0,
) -> list[dict]:
    """Per σ: readouts, every method's output, and per-image metrics (lists, JSON-ready)."""
    images, public = load_dataset(dataset, n)
    tune_images = public[-n_tune:]
    results = []
    for sigma in sigmas:
        t0 = time.perf_counter()
        ro = opacus_readouts(images, public, sigma=sigma, seed=seed)
        truth, raw, std = ro["truth"], ro["raw"], finite_std(ro["std"])
        outputs = {"raw": raw.clamp(0, 1)}
        if classical:
            tune = opacus_readouts(tune_images, public, sigma=sigma, seed=seed + 1)
            method, den = best_classical(
                truth,
                raw,
                std,
                tune["truth"],
                tune["raw"],
                tune["std"],
                score=lambda a, b: lpips(a, b),
                methods=classical,
            )
            outputs[f"classical ({method})"] = den
        speed = {}
        for name, steps in samplers:
            sub = slice(0, paper_n) if name == PAPER else slice(None)
            if name == PAPER and paper_n == 0:
                continue
            start = time.perf_counter()
            out = prior.denoise(
                raw[sub],
                noise_std=std[sub],
                sampler=name,
                steps=steps,
                generator=torch.Generator().manual_seed(seed),
            )
            speed[name] = out.shape[0] / (time.perf_counter() - start)
            outputs[name if name != "ddim" else f"ddim-{steps}"] = out
        scores = {}
        for label, img in outputs.items():
            ref = truth[: img.shape[0]]
            scores[label] = {
                "mse": mse(img, ref).tolist(),
                "ssim": ssim(img, ref).tolist(),
                "lpips": lpips(img, ref).tolist(),
            }
        results.append(
            {
                "dataset": dataset,
                "sigma": sigma,
                "mu": ro["mu"],
                "epsilon_one_step": ro["epsilon"],
                "images": ro["total"],
                "singletons": int(truth.shape[0]),
                "found": int(ro["found"].sum()),
                "found_mask": ro["found"].tolist(),
                "noise_std": ro["std"].tolist(),
                "scores": scores,
                "images_per_second": speed,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"  [{dataset} σ={sigma:g}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return results


def _mean(values, k=None) -> float:
    vals = values[:k] if k else values
    return sum(vals) / len(vals) if vals else float("nan")


def print_table(results: list[dict], paper_n: int) -> None:
    print(
        f"{'σ':>7} {'µ/step':>7} {'ε 1 step':>8} {'std':>6} {'found':>9} {'method':<24} "
        f"{'MSE':>7} {'SSIM':>6} {'LPIPS':>6}"
    )
    for r in results:
        std = torch.tensor(r["noise_std"])
        head = (
            f"{r['sigma']:>7g} {r['mu']:>7.4g} {r['epsilon_one_step']:>8.4g} "
            f"{float(std.median()):>6.3g} {r['found']:>4d}/{r['singletons']:<4d}"
        )
        for label, s in r["scores"].items():
            if len(s["lpips"]) != r["singletons"]:
                continue  # a subset-only method: in the table below
            print(
                f"{head} {label:<24} {_mean(s['mse']):7.4f} {_mean(s['ssim']):6.3f} "
                f"{_mean(s['lpips']):6.3f}"
            )
            head = " " * len(head)
    if not paper_n:
        return
    print(f"\nthe paper's loop ({PAPER}) against every method, on the first {paper_n} lone images")
    print(f"{'σ':>7} {'method':<24} {'MSE':>7} {'SSIM':>6} {'LPIPS':>6}")
    for r in results:
        k = min(len(s["lpips"]) for s in r["scores"].values())
        head = f"{r['sigma']:>7g}"
        for label, s in r["scores"].items():
            print(
                f"{head} {label:<24} {_mean(s['mse'], k):7.4f} {_mean(s['ssim'], k):6.3f} "
                f"{_mean(s['lpips'], k):6.3f}"
            )
            head = " " * len(head)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["dataset"] for r in results})
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        rows = [r for r in results if r["dataset"] == name]
        series: dict[str, tuple[list, list]] = {}
        for r in rows:
            for key, s in r["scores"].items():
                if len(s["lpips"]) != r["singletons"]:
                    continue  # the paper's loop ran on a subset: not comparable here
                label = "best classical" if key.startswith("classical") else key
                xs, ys = series.setdefault(label, ([], []))
                xs.append(r["sigma"])
                ys.append(_mean(s["lpips"]))
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("noise multiplier σ")
        direction = "higher" if HIGHER_IS_BETTER["lpips"] else "lower"
        ax.set_ylabel(f"{METRICS['lpips'].label}-VGG ({direction} is better)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    ap.add_argument("--n", type=int, help="images per set (full: 640 MNIST, all 1017 CIFAR-10)")
    ap.add_argument("--paper-n", type=int, help="images for the paper's loop (full: 50)")
    ap.add_argument("--prior-mnist", default=PRIORS["mnist"])
    ap.add_argument("--prior-cifar10", default=PRIORS["cifar10"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lpips = LPIPS()
    all_results = []
    for name in args.datasets:
        grid = GRIDS[name] if args.full else GRIDS[name][2:3]
        n = args.n or ((640 if name == "mnist" else 1017) if args.full else 32)
        paper_n = args.paper_n if args.paper_n is not None else (50 if args.full else 4)
        prior = DiffusionPrior.from_pretrained(getattr(args, f"prior_{name}"))
        print(f"\n{name}: {n} real images, prior {prior.source}, σ grid {list(grid)}")
        results = evaluate(
            name,
            n=n,
            sigmas=grid,
            prior=prior,
            lpips=lpips,
            paper_n=paper_n,
            n_tune=64 if args.full else 16,
            classical=("tv", "wavelet", "nlm") if args.full else ("tv",),
            seed=args.seed,
        )
        print_table(results, paper_n)
        all_results += results
    suffix = "" if args.full else "_quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_vs_noise{suffix}.json").write_text(json.dumps(all_results))
    plot(all_results, out / f"quality_vs_noise{suffix}.png")
    print(f"\nper-image scores: {out / f'quality_vs_noise{suffix}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
