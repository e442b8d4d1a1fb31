"""A hold-out of the verdict: what it says against what the audited images show.

    python benchmarks/verdict_holdout.py          # quick: MNIST, B = 32, σ = 0.05, shadow (~5 min)
    python benchmarks/verdict_holdout.py --full   # MNIST and CIFAR-10, B ∈ {1, 32, 512},
                                                  # σ ∈ {0.002, 0.05, 1}, live and shadow,
                                                  # max_images ∈ {None, 2}: 72 runs

Each row is one real training run audited end to end by ``DMAuditor`` (real Opacus, Poisson
batches of expected size ``B``, the package's small CNN; live: an ``ImprintBlock`` with its default
128 bins in front of it; shadow: the model alone, the adversary sized to the batch), with the
data set's embedded prior, public images (MNIST-5k training digits; natural-image patches for
CIFAR-10: all of them calibrate the bins, a sample of :data:`BASELINE_PUBLIC` is ``public=`` for the
baselines), MSE/SSIM/LPIPS, :data:`AUDITS` audits. ``close()`` gives the run's verdict. The
baselines are measured once per data set, batch size and geometry (the auditor caches them), so
the σ and ``max_images`` runs of one such cell share that cost.

Beside it, what the images show, per target (a lone sample found and scored), pooled over the
run's audits and recomputed here from the records' per-target counts: ``success`` (the criterion,
LPIPS ≤ 0.1) and ``ident`` (identification, in the distance where it is strongest), each as
``hits/targets`` for the raw readout and the diffusion prior's output (DM) side by side, with the
smallest one-sided binomial p-value of any of them against its baseline's upper limit. A row
**violates** the hold-out when the verdict says "no visible leakage" or "no reconstruction beyond
what a guess achieves" although some per-target count is above its baseline at p < 1e-3 (no
multiplicity correction here: the strict reading). The script exits non-zero on a violation.

Evaluation images: MNIST test digits (``../shared/data/mnist``) and the 1017 CIFAR-10 test images
(``../shared/data/cifar10``); ``N = min(8·B, images)`` of them are the training set. Nothing is
tuned to either set: the auditor runs with its defaults.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import PRIORS, load_dataset
from torch import nn

from opacus_dmaudit import DMAuditor
from opacus_dmaudit.assets.models import small_cnn
from opacus_dmaudit.capture.imprint import ImprintBlock
from opacus_dmaudit.capture.shadow import ShadowAdversary
from opacus_dmaudit.score.binomial import p_value

QUICK = {
    "datasets": ("mnist",),
    "batches": (32,),
    "sigmas": (0.05,),
    "modes": ("shadow",),
    "caps": (None,),
}
FULL = {
    "datasets": ("mnist", "cifar10"),
    "batches": (1, 32, 512),
    "sigmas": (0.002, 0.05, 1.0),
    "modes": ("shadow", "live"),
    "caps": (None, 2),
}
#: Audits per run (every step is audited; batch 1 gets more, its audits have one target at most).
AUDITS = {1: 16, 32: 3, 512: 1}
NEGATIVE = ("no_visible_leakage", "not_above_baseline")
#: Public images the auditor's baselines are measured on (a random sample; the shadow bins are
#: calibrated on all of them). Fewer than the auditor's 384 keeps the attach-time cost down; the
#: upper limits are then wider, which only makes a negative verdict harder to earn.
BASELINE_PUBLIC = 128
LEVEL = 1e-3


def train_audited(images, public, *, name, batch, sigma, mode, cap, seed, log_dir):
    """One audited DP-SGD run of :data:`AUDITS` steps: ``(its records, its RunSummary)``."""
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    n = min(8 * batch, len(images))
    x = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))
    shape = tuple(x.shape[1:])
    cnn = small_cnn(shape[0], shape[-1])
    model = nn.Sequential(ImprintBlock(image_shape=shape).calibrate(public), cnn)
    model = model if mode == "live" else cnn
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, labels), batch_size=batch
        ),
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(seed + 1),
    )
    auditor = DMAuditor(
        privacy_engine=engine,
        log_dir=log_dir,
        every_n_steps=1,
        prior=PRIORS[name],
        # the shadow bins need one public image per bin; the baselines a random sample
        shadow=ShadowAdversary(public=public) if mode == "shadow" else False,
        public=public[
            torch.randperm(len(public), generator=torch.Generator().manual_seed(seed))[
                :BASELINE_PUBLIC
            ]
        ],
        max_images=cap,
        metrics=("mse", "ssim", "lpips"),
        tensorboard=False,
        save_images=False,
        seed=seed,
    ).attach(opt, model=model)
    steps, wanted = 0, AUDITS.get(batch, 2)
    try:
        while steps < wanted:
            for xb, yb in loader:  # Poisson batches; an empty one is a step too
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                steps += 1
                if steps >= wanted:
                    break
    finally:
        summary = auditor.close()
    return auditor.history, summary


def evidence(history) -> dict:
    """Per-target counts pooled over the run's audits, each tested against its baseline."""
    targets, success, ident, limits = 0, {}, {}, {}
    for r in history:
        t = getattr(r, "targets", None)
        if t is None:
            continue
        targets += t.attempted
        for stage, k in t.success.items():
            success[stage] = success.get(stage, 0) + k
        for metric, by_stage in t.identified.items():
            for stage, k in by_stage.items():
                ident[(metric, stage)] = ident.get((metric, stage), 0) + k
        for key in ("success", "identification"):
            for metric in ("mse", "ssim", "lpips", None):
                value = t.baseline(key, metric)
                if value is not None:
                    limits[(key, metric)] = max(limits.get((key, metric), 0.0), value)
    tests = []
    for stage, k in success.items():
        if ("success", None) in limits:
            tests.append(
                ("success", "lpips", stage, k, p_value(k, targets, limits["success", None]))
            )
    for (metric, stage), k in ident.items():
        if ("identification", metric) in limits:
            p0 = limits["identification", metric]
            tests.append(("ident", metric, stage, k, p_value(k, targets, p0)))
    return {"targets": targets, "tests": tests}


def cell(ev: dict, kind: str, stage: str) -> str:
    """``hits/targets`` of the strongest test of ``kind`` at ``stage``."""
    rows = [t for t in ev["tests"] if t[0] == kind and t[2] == stage]
    if not rows:
        return "-"
    best = min(rows, key=lambda t: t[4])
    return f"{best[3]}/{ev['targets']}" + (f" {best[1]}" if kind == "ident" else "")


def run(mode: str, *, seed: int, only: dict | None = None) -> list[dict]:
    grid = dict(QUICK if mode == "quick" else FULL, **(only or {}))
    rows = []
    for name in grid["datasets"]:
        images, public = load_dataset(name)
        for batch in grid["batches"]:
            for sigma in grid["sigmas"]:
                for adversary in grid["modes"]:
                    for cap in grid["caps"]:
                        t0 = time.perf_counter()
                        with tempfile.TemporaryDirectory() as tmp:
                            history, summary = train_audited(
                                images, public, name=name, batch=batch, sigma=sigma,
                                mode=adversary, cap=cap, seed=seed, log_dir=Path(tmp) / "run",
                            )  # fmt: skip
                        ev = evidence(history)
                        p_min = min((t[4] for t in ev["tests"]), default=1.0)
                        row = {
                            "data": name, "B": batch, "sigma": sigma, "mode": adversary,
                            "max_images": cap, "audits": len(history),
                            "verdict": summary.verdict.status,
                            "headline": summary.verdict.headline,
                            "targets": ev["targets"], "p_min": p_min,
                            **{f"{k}_{s}": cell(ev, k, s)
                               for k in ("success", "ident") for s in ("raw", "dm")},
                            "violation": summary.verdict.status in NEGATIVE and p_min < LEVEL,
                            "seconds": time.perf_counter() - t0,
                        }  # fmt: skip
                        rows.append(row)
                        print_row(row)
    return rows


def print_row(r: dict) -> None:
    cap = "all" if r["max_images"] is None else str(r["max_images"])
    p = "-" if r["p_min"] >= 1 else f"{r['p_min']:.0e}" if r["p_min"] > 0 else "0"
    print(
        f"{r['data']:8s} {r['B']:4d} {r['sigma']:6.3f} {r['mode']:6s} {cap:>3s} "
        f"{r['success_raw']:>9s} {r['success_dm']:>9s} {r['ident_raw']:>15s} "
        f"{r['ident_dm']:>15s} {p:>6s}  {r['verdict']:19s}"
        f"{' VIOLATION' if r['violation'] else ''} {r['seconds']:5.0f}s",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--datasets", nargs="+", choices=["mnist", "cifar10"])
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--sigmas", type=float, nargs="+")
    ap.add_argument("--modes", nargs="+", choices=["shadow", "live"])
    ap.add_argument("--out", help="write the rows as JSON to this file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    only = {
        k: tuple(v)
        for k, v in vars(args).items()
        if k in ("datasets", "batches", "sigmas", "modes") and v
    }
    print(
        f"{'data':8s} {'B':>4s} {'σ':>6s} {'mode':6s} {'cap':>3s} {'succ raw':>9s} {'succ DM':>9s}"
        f" {'ident raw':>15s} {'ident DM':>15s} {'min p':>6s}  verdict"
    )
    t0 = time.perf_counter()
    rows = run("full" if args.full else "quick", seed=args.seed, only=only)
    bad = [r for r in rows if r["violation"]]
    print(
        f"{len(rows)} runs, {len(bad)} violations (negative verdict with a per-target count above "
        f"its baseline at p < {LEVEL:g}); total {time.perf_counter() - t0:.0f} s"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1, default=str))
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
