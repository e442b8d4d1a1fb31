"""Denoising quality and speed of the diffusion prior on real held-out digits.

    python benchmarks/prior_quality.py            # quick: 48 digits (paper's loop on 12), 0.2 and 0.8
    python benchmarks/prior_quality.py --full     # 500 digits (paper's loop on 100), 0.1 0.2 0.4 0.8

Real MNIST test digits (``../shared/data/mnist``; the embedded prior was trained on MNIST-5k
training-set digits only) get Gaussian noise of a known std in [0, 1] units. Every denoiser sees
the same noisy images, not clipped (the raw row is clipped only for scoring, as every output is).

Two tables per noise level, each scored on one set of images throughout:

* **all digits**: the raw noisy image, each scikit-image denoiser with its knob tuned per level on
  100 *other* test digits (by LPIPS), the best of them per column, and the prior's cheap samplers
  in fp32 and in channels_last + bf16 autocast: DDIM-10/DDIM-20 (``denoise``'s default stride 10),
  DDIM-20/s20 (the auditor's default, ``sampler_min_stride=20``) and the posterior mean;
* **against the paper's loop** (first ``--paper-n`` digits; the paper's loop costs t* model calls
  per image): the paper's Algorithm 1 (``"ddim-every-step"``: DDIM η = 0 at every timestep from
  t*) in fp32, the reference of the "x paper" column, and in bf16; DDPM ancestral sampling
  (``"ancestral"``, a variant, not the paper's loop); and the cheap samplers again, run and timed
  on the same digits.

Images per second are measured side by side in one run. Also saves a grid of unconditional
samples of the prior (``--out``) and prints a few as text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import shared_data_dir

from opacus_dmaudit.assets.data import load_mnist_idx
from opacus_dmaudit.reconstruct.classical import classical_denoise, tune_classical
from opacus_dmaudit.reconstruct.prior import DiffusionPrior
from opacus_dmaudit.schema import HIGHER_IS_BETTER, meets
from opacus_dmaudit.score.metrics import LPIPS, mse, ssim

SHADES = " .:-=+*#%@"
#: The metrics of a scored row ``(label, MSE, SSIM, LPIPS, img/s)``, in column order from 1.
COLUMNS = ("mse", "ssim", "lpips")


def ascii_digits(images: torch.Tensor, step: int = 2) -> str:
    """Render ``(N, 1, H, W)`` images side by side as text (every ``step``-th pixel)."""
    rows = []
    for r in range(0, images.shape[2], step):
        line = []
        for img in images:
            vals = img[0, r, ::step].clamp(0, 1)
            line.append("".join(SHADES[int(v * (len(SHADES) - 1))] for v in vals))
        rows.append("  ".join(line))
    return "\n".join(rows)


def save_grid(images: torch.Tensor, path: Path, ncol: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol, nrow))
    for ax, i in zip(axes.flat, range(nrow * ncol)):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
    fig.tight_layout(pad=0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


#: model evaluations per image of each row (counted, so independent of the machine's load)
EVALS: dict[str, float] = {}


def run(prior, precision, noisy, level, name, steps, stride, seed) -> tuple[torch.Tensor, float]:
    """One sampler on ``noisy``: ``(output, images per second)``; counts its model evaluations."""
    evals = []
    hook = prior.unet.register_forward_hook(lambda m, a, o: evals.append(a[0].shape[0]))
    t0 = time.perf_counter()
    try:
        out = prior.denoise(
            noisy,
            noise_std=level,
            sampler=name,
            steps=steps,
            min_stride=stride,
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        hook.remove()
    speed = noisy.shape[0] / (time.perf_counter() - t0)
    EVALS[label(name, steps, stride, precision)] = sum(evals) / noisy.shape[0]
    return out, speed


def label(name: str, steps: int, stride: int, precision: str) -> str:
    if name == "ddim":
        return f"ddim-{steps}{'' if stride == 10 else f'/s{stride}'} {precision}"
    return f"{name} {precision}"


def score_rows(rows, clean, lp) -> list[tuple]:
    """``(label, MSE, SSIM, LPIPS, img/s)`` of each row against ``clean`` (same images for all)."""
    out = []
    for name, img, speed in rows:
        assert img.shape[0] == clean.shape[0], name  # every row on the same images
        out.append(
            (
                name,
                float(mse(img, clean).mean()),
                float(ssim(img, clean).mean()),
                float(lp(img, clean).mean()),
                speed,
            )
        )
    return out


def best(metric: str, values) -> float:
    """The best of ``values`` of ``metric``, by the metric's direction."""
    return (max if HIGHER_IS_BETTER[metric] else min)(values)


def beats(metric: str, value: float, other: float) -> bool:
    """Whether ``value`` of ``metric`` is strictly better than ``other``."""
    return value > other if HIGHER_IS_BETTER[metric] else value < other


def with_best_classical(scored: list[tuple], classical: set[str]) -> list[tuple]:
    """``scored`` with a "best classical" row: each metric's best over the classical rows."""
    rows = [r for r in scored if r[0] in classical]
    columns = [best(m, [r[i] for r in rows]) for i, m in enumerate(COLUMNS, start=1)]
    best_row = ("best classical", *columns, None)
    at = max(i for i, r in enumerate(scored) if r[0] in classical) + 1
    return scored[:at] + [best_row] + scored[at:]


def print_rows(level: float, scored: list[tuple], ref_speed: float | None) -> None:
    print(
        f"{'std':>5} {'method':<28} {'MSE':>8} {'SSIM':>7} {'LPIPS':>7} {'evals/img':>9} "
        f"{'img/s':>8} {'x paper':>8}"
    )
    for name, m, s_, l_, speed in scored:
        sp = f"{'':9} {'':8} {'':8}"
        if speed:
            ratio = f"{speed / ref_speed:7.1f}x" if ref_speed else f"{'':8}"
            sp = f"{EVALS.get(name, float('nan')):9.1f} {speed:8.1f} {ratio}"
        print(f"{level:>5g} {name:<28} {m:8.4f} {s_:7.3f} {l_:7.3f} {sp}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="500 digits at 0.1 0.2 0.4 0.8")
    ap.add_argument("--n", type=int, help="number of test digits to score")
    ap.add_argument("--levels", type=float, nargs="+", help="noise stds in [0, 1] units")
    ap.add_argument("--prior", default="embedded:mnist")
    ap.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--out", default="benchmarks/results", help="where the sample grid goes")
    ap.add_argument("--paper-n", type=int, help="digits for the paper's loop (full: 100)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument(
        "--paper-only",
        action="store_true",
        help="only the table against the paper's loop (skip the all-digits table)",
    )
    ap.add_argument("--ancestral", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.n or (500 if args.full else 48)
    n_paper = min(n, args.paper_n or (100 if args.full else 12))
    levels = args.levels or ([0.1, 0.2, 0.4, 0.8] if args.full else [0.2, 0.8])

    shared = shared_data_dir()
    if shared is None:
        print("../shared/data is missing: this benchmark needs the MNIST test set", file=sys.stderr)
        return 2
    test = load_mnist_idx(shared / "mnist" / "t10k-images-idx3-ubyte.gz")
    clean, tune_set = test[:n], test[-100:]
    if n > test.shape[0] - 100:
        raise SystemExit(f"--n must be at most {test.shape[0] - 100}")

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    priors = {
        p: DiffusionPrior.from_pretrained(args.prior, dtype=dtypes[p]) for p in args.precisions
    }
    ref_precision = args.precisions[0]
    paper_ref = f"ddim-every-step {ref_precision}"
    lp = LPIPS()
    # (sampler, steps, min_stride): denoise's default stride is 10; the auditor's default is
    # DDIM-20 at stride 20 ("/s20")
    cheap = [("ddim", s, 10) for s in args.ddim_steps] + [
        ("ddim", 20, 20),
        ("posterior-mean", 1, 1),
    ]

    print(f"prior: {args.prior} ({priors[ref_precision].num_parameters / 1e6:.2f}M parameters)")
    print(
        f"data: first {n} MNIST test digits (the paper's loop: first {n_paper}); classical knobs "
        "tuned on the last 100 by LPIPS"
    )
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}\n")

    summary = []
    for level in levels:
        g = torch.Generator().manual_seed(args.seed)
        noisy = clean + level * torch.randn(clean.shape, generator=g)
        tune_noisy = tune_set + level * torch.randn(tune_set.shape, generator=g)
        t_star = int(priors[ref_precision].timesteps_for(level)[0])
        print(f"noise std {level} (model units {2 * level:g}, t* = {t_star})")

        # -- all digits ------------------------------------------------------------------------
        rows: list[tuple[str, torch.Tensor, float | None]] = [("raw", noisy.clamp(0, 1), None)]
        knobs = tune_classical(tune_set, tune_noisy, noise_std=level, score=lambda a, b: lp(a, b))
        classical, best_label = set(), {}
        for method, knob in knobs.items():
            den = classical_denoise(noisy, method=method, noise_std=level, knob=knob)
            knob_s = "/".join(map(str, knob)) if isinstance(knob, tuple) else knob
            rows.append((f"{method} ({knob_s})", den, None))
            classical.add(rows[-1][0])
            best_label[rows[-1][0]] = (method, knob)
        if not args.paper_only:
            for name, steps, stride in cheap:
                for precision, prior in priors.items():
                    out, speed = run(prior, precision, noisy, level, name, steps, stride, args.seed)
                    rows.append((label(name, steps, stride, precision), out, speed))
        scored = with_best_classical(score_rows(rows, clean, lp), classical)
        if not args.paper_only:
            print(f"all {n} digits")
            print_rows(level, scored, None)

        # -- against the paper's loop, on its subset -------------------------------------------
        sub, sub_clean = noisy[:n_paper], clean[:n_paper]
        best_name = min((r for r in scored if r[0] in classical), key=lambda r: r[3])[0]
        method, knob = best_label[best_name]
        rows = [
            ("raw", sub.clamp(0, 1), None),
            (
                f"best classical by LPIPS ({best_name})",
                classical_denoise(sub, method=method, noise_std=level, knob=knob),
                None,
            ),
        ]
        paper = [("ddim-every-step", p) for p in args.precisions]
        if args.ancestral:
            paper.append(("ancestral", args.precisions[-1]))
        for name, precision in paper:
            out, speed = run(priors[precision], precision, sub, level, name, 1, 1, args.seed)
            rows.append((label(name, 1, 1, precision), out, speed))
        for name, steps, stride in cheap:
            precision = args.precisions[-1]
            out, speed = run(
                priors[precision], precision, sub, level, name, steps, stride, args.seed
            )
            rows.append((label(name, steps, stride, precision), out, speed))
        sub_scored = score_rows(rows, sub_clean, lp)
        ref = next(r[4] for r in sub_scored if r[0] == paper_ref)
        print(f"first {n_paper} digits, against the paper's loop ({paper_ref} = 1.0x)")
        print_rows(level, sub_scored, ref)
        print()
        summary.append((level, scored, sub_scored))

    # Requirements of the prior issue, checked on the default sampler (ddim-20 in bf16 and fp32).
    print("checks (denoise's default sampler ddim-20, all digits):")
    ok = True
    for level, scored, _ in [] if args.paper_only else summary:
        raw = scored[0]
        classical_best = next(r for r in scored if r[0] == "best classical")
        for name in ("ddim-20 fp32", "ddim-20 bf16"):
            r = next((x for x in scored if x[0] == name), None)
            if r is None:
                continue
            beats_raw = all(beats(m, r[i], raw[i]) for i, m in enumerate(COLUMNS, start=1))
            beats_cl = beats("lpips", r[3], classical_best[3])
            ok &= beats_raw and (beats_cl or level < 0.2)
            print(
                f"  std {level:g} {name}: beats raw on MSE/SSIM/LPIPS: {beats_raw}; "
                f"LPIPS below best classical: {beats_cl}"
            )

    print(f"\nspeed (fastest sampler with LPIPS no worse than the paper's loop, {paper_ref}):")
    for level, _, sub_scored in summary:
        paper = next(r for r in sub_scored if r[0] == paper_ref)
        # LPIPS no worse than the paper's loop's
        fair = [
            r for r in sub_scored if r[4] and meets("lpips", r[3], paper[3]) and r[0] != paper_ref
        ]
        if fair:
            r = max(fair, key=lambda x: x[4])
            print(
                f"  std {level:g}: {r[0]} at {r[4] / paper[4]:.1f}x the paper's loop "
                f"(LPIPS {r[3]:.3f} vs {paper[3]:.3f})"
            )
        else:
            print(f"  std {level:g}: no faster sampler matches the paper's loop's LPIPS")

    g = torch.Generator().manual_seed(args.seed)
    samples = priors[args.precisions[-1]].sample(64, steps=50, generator=g)
    grid = Path(args.out) / "prior_samples.png"
    save_grid(samples, grid)
    print(f"\n64 unconditional samples (DDIM-50 from pure noise) saved to {grid}; the first 8:")
    print(ascii_digits(samples[:8]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
