"""Batch size: the shadow adversary sized to the batch against a fixed 128-bin adversary.

    python benchmarks/batch_size.py          # quick: MNIST, B ∈ {64, 512}, σ = 0.002 (~2 min)
    python benchmarks/batch_size.py --full   # MNIST and CIFAR-10, B ∈ {1, 64, 256, 512, 1024},
                                             # σ ∈ {0.002, 0.02}, float32 (and bf16 at
                                         # σ = 0.002): about 15–25 min on 2 cores

Only a sample alone in its bin can be read out of an imprint layer, and ``K`` equal-mass bins
leave a share ``(1 − 1/K)^(B − 1)`` of a batch of ``B`` alone: a fixed ``K = 128`` reads most of a
batch of 64 and almost nothing of a batch of 1024. The shadow adversary sizes ``K`` to the batch
(``ShadowAdversary(num_bins=None)``: 90 % alone, within its memory cap and the public images that
calibrate the bins). This benchmark measures both on real images through real DP-SGD steps.

Each cell: batches of ``B`` real evaluation images (MNIST test digits; the 1017 CIFAR-10 test
images, so ``B = 1024`` there is the whole set of 1017), one real Opacus step each (the package's
small CNN, C = 1, noise multiplier σ, fixed batches), captured as the auditor captures a shadow
step; the shadow adversary (bins calibrated on the public images of ``common.load_dataset``)
simulates the step and the auditor's own ``score_step`` reads and scores it (raw readout, no
prior). Columns:

* ``K``: bins used (``128``, or the sized ``K`` and what limited it);
* ``alone``: the expected share of the batch alone in a bin, ``(1 − 1/K)^(B − 1)``;
* ``targets``: lone samples found and scored (the verdict's per-target trials), per image;
* ``per-target``: share of targets whose raw readout meets the auditor's default success
  criterion (LPIPS ≤ 0.1): what the per-target test counts;
* ``exposure``: targets reconstructed / images in the batches: the share of the batch an
  attacker reads (the issue's target: ≥ 50 % at B = 512, σ = 0.002 for the sized adversary).

With ``--prior`` the lone targets' readouts also go through the data set's embedded diffusion
prior with the auditor's default sampler (as an audit denoises them), and two more columns give
the DM's ``per-target`` share and ``exposure``; the target is then checked on the better of the
raw readout and the DM, as an audit reports both. The prior costs minutes per sized cell on CPU:
narrow the grid (``--datasets cifar10 --batches 512 --sigmas 0.002``).

``bf16`` rows round the batch to bfloat16 before the step (a model trained in bf16 sees those
inputs); the simulated sums are float32/float64 either way. Nothing here is tuned to a data set:
the bins come from public images, the criterion is the auditor's default.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from common import CNN_WIDTH, capture_every_step, load_dataset

from opacus_dmaudit.assets.models import small_cnn
from opacus_dmaudit.capture.shadow import ShadowAdversary
from opacus_dmaudit.config import AuditConfig
from opacus_dmaudit.reconstruct.bins import lone_share
from opacus_dmaudit.schema import METRICS, meets
from opacus_dmaudit.score.metrics import LPIPS, stage_metrics
from opacus_dmaudit.score.scoring import score_step

QUICK = {"datasets": ("mnist",), "batches": (64, 512), "sigmas": (0.002,), "dtypes": ("float32",)}
FULL = {
    "datasets": ("mnist", "cifar10"),
    "batches": (1, 64, 256, 512, 1024),
    "sigmas": (0.002, 0.02),
    "dtypes": ("float32", "bf16"),
}
#: Images per cell (at least one batch, at most 64 batches): about 460 targets per sized cell.
IMAGES = {"quick": 512, "full": 512}
FIXED_BINS = 128
#: The auditor's default success criterion: LPIPS ≤ 0.1.
LPIPS_THRESHOLD = METRICS["lpips"].default_threshold
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def real_steps(images: torch.Tensor, *, batch: int, sigma: float, dtype: str, seed: int) -> list:
    """One real DP-SGD step per batch of ``batch`` images (fixed batches), each captured as
    the auditor captures a shadow step (inputs, σ, C; no imprint layer in the model)."""
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    x = images.to(DTYPES[dtype]).float()
    shape = tuple(x.shape[1:])
    model = small_cnn(shape[0], shape[-1], width=CNN_WIDTH)
    labels = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(seed))
    model, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, labels), batch_size=batch
        ),
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    steps = capture_every_step(model, opt, loader, shadow_model=model)
    return [s for s in steps if s.batch_size == batch]  # a short last batch is not this cell


def score_cell(
    steps: list, public: torch.Tensor, *, bins: int | None, lpips: LPIPS, seed: int, prior=None
):
    """The adversary with ``bins`` (``None``: sized) on every step: counts over the cell.

    The auditor's ``score_step`` reads, tests and matches each step (MSE only, to spare the
    clean stage's LPIPS); the success criterion, LPIPS ≤ 0.1 (the auditor's default), is then
    scored on the raw readouts of the lone targets only, as an audit scores them, and with a
    ``prior`` on their DM reconstructions too.
    """
    config = AuditConfig(metrics=("mse",), seed=seed)
    adversary = ShadowAdversary(num_bins=bins, public=public)
    plan = adversary.size_for(steps[0].batch_size, tuple(steps[0].inputs.shape[1:]))
    gen = torch.Generator().manual_seed(seed)
    images = targets = hits = dm_hits = 0
    for captured in steps:
        scored = score_step(adversary.simulate(captured, generator=gen), config)
        lone = [
            (row, t)
            for row, t in enumerate(scored.truth_index)
            if t is not None and scored.images[row]["true_count"] == 1
        ]
        images += captured.batch_size
        targets += len(lone)
        if lone:
            raw = scored.found.images[[row for row, _ in lone]].float()  # value range (0, 1)
            truth = captured.inputs[[t for _, t in lone]].float()
            stages = {"raw": raw}
            if prior is not None:
                stages["dm"] = _denoise(prior, scored, [row for row, _ in lone], config, gen)
            values = stage_metrics(stages, truth, names=("lpips",), lpips=lpips)
            hits += sum(meets("lpips", float(v), LPIPS_THRESHOLD) for v in values["raw"]["lpips"])
            if prior is not None:
                dm = values["dm"]["lpips"]
                dm_hits += sum(meets("lpips", float(v), LPIPS_THRESHOLD) for v in dm)
    plan = adversary.plan  # as used: ties in the public images' projections may cut the bins
    return {
        "K": plan.num_bins,
        "limited_by": plan.limited_by if bins is None else "fixed",
        "alone": lone_share(plan.num_bins, steps[0].batch_size),
        "images": images,
        "targets": targets,
        "reconstructed": hits,
        "per_target": hits / targets if targets else None,
        "exposure": hits / images,
        **(
            {
                "dm_reconstructed": dm_hits,
                "dm_per_target": dm_hits / targets if targets else None,
                "dm_exposure": dm_hits / images,
            }
            if prior is not None
            else {}
        ),
    }


def _denoise(prior, scored, rows: list[int], config: AuditConfig, generator) -> torch.Tensor:
    """The DM reconstructions of ``rows`` of a scored step, as the auditor makes them."""
    return prior.denoise(
        scored.found.images[rows].float(),
        noise_std=scored.found.noise_std[rows].double(),
        sampler=config.sampler,
        steps=config.sampler_steps,
        min_stride=config.sampler_min_stride,
        generator=generator,
    )


def run(mode: str, *, seed: int, only: dict | None = None, with_prior: bool = False) -> list[dict]:
    """Every cell of ``mode``'s grid (``only`` narrows it), printed as it finishes."""
    grid = dict(QUICK if mode == "quick" else FULL, **(only or {}))
    only_dtypes = bool(only and only.get("dtypes"))
    lpips, rows = LPIPS(), []
    for name in grid["datasets"]:
        evaluation, public = load_dataset(name)
        prior = _prior(name) if with_prior else None
        perm = torch.randperm(len(evaluation), generator=torch.Generator().manual_seed(seed))
        for batch in grid["batches"]:
            b = min(batch, len(evaluation))  # CIFAR-10: 1017 images in all
            n = min(len(evaluation) // b * b, max(b, min(IMAGES[mode], 64 * b) // b * b))
            for sigma in grid["sigmas"]:
                for dtype in grid["dtypes"]:
                    if dtype != "float32" and sigma != min(grid["sigmas"]) and not only_dtypes:
                        continue  # bf16: at the smallest σ only (where rounding could show)
                    t0 = time.perf_counter()
                    steps = real_steps(
                        evaluation[perm[:n]], batch=b, sigma=sigma, dtype=dtype, seed=seed
                    )
                    for bins in (FIXED_BINS, None):
                        cell = score_cell(
                            steps, public, bins=bins, lpips=lpips, seed=seed, prior=prior
                        )
                        cell.update(data=name, B=b, sigma=sigma, dtype=dtype)
                        cell["seconds"] = time.perf_counter() - t0
                        rows.append(cell)
                        print_row(cell)
    return rows


def _prior(name: str):
    """The data set's embedded prior (as the auditor's default for such images)."""
    from common import PRIORS

    from opacus_dmaudit import DiffusionPrior

    return DiffusionPrior.from_pretrained(PRIORS[name])


def print_row(r: dict) -> None:
    per = "   -  " if r["per_target"] is None else f"{r['per_target']:6.1%}"
    limited = "" if r["limited_by"] in (None, "fixed") else f" ({r['limited_by']})"
    print(
        f"{r['data']:8s} {r['B']:5d} {r['sigma']:6.3f} {r['dtype']:7s} {r['K']:6d}"
        f"{limited:17s} {r['alone']:6.1%} {r['targets']:5d}/{r['images']:<5d} {per}"
        f" {r['exposure']:7.1%}{_dm_columns(r)} {r['seconds']:6.1f}s",
        flush=True,
    )


def _dm_columns(r: dict) -> str:
    if "dm_exposure" not in r:
        return ""
    per = "   -  " if r["dm_per_target"] is None else f"{r['dm_per_target']:6.1%}"
    return f" {per} {r['dm_exposure']:7.1%}"


def _best_exposure(r: dict) -> float:
    return max(r["exposure"], r.get("dm_exposure", 0.0))


def check_target(rows: list[dict]) -> str | None:
    """The issue's target, where the grid has its cell: sized K, B = 512, σ = 0.002."""
    cells = [
        r
        for r in rows
        if r["B"] == 512 and math.isclose(r["sigma"], 0.002) and r["limited_by"] != "fixed"
    ]
    if not cells:
        return None
    ok = all(_best_exposure(r) >= 0.5 for r in cells)
    shares = ", ".join(f"{r['data']} {r['dtype']} {_best_exposure(r):.1%}" for r in cells)
    return f"target (sized K, B = 512, σ = 0.002, exposure ≥ 50 %): {'met' if ok else 'MISSED'}: {shares}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--datasets", nargs="+", choices=["mnist", "cifar10"])
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: the grid)")
    ap.add_argument("--sigmas", type=float, nargs="+", help="noise multipliers (default: grid)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    ap.add_argument("--out", help="write the rows as JSON to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prior", action="store_true", help="also score the DM (embedded prior)")
    args = ap.parse_args()
    only = {
        k: tuple(v)
        for k, v in vars(args).items()
        if k in ("datasets", "batches", "sigmas", "dtypes") and v
    }
    print(
        f"{'data':8s} {'B':>5s} {'σ':>6s} {'dtype':7s} {'K':>6s}{'':17s} {'alone':>6s}"
        f" {'targets/images':>11s} {'per-target':>6s} {'exposure':>7s}"
        + (f" {'DM per-target':>6s} {'DM exposure':>7s}" if args.prior else "")
    )
    t0 = time.perf_counter()
    rows = run("full" if args.full else "quick", seed=args.seed, only=only, with_prior=args.prior)
    target = check_target(rows)
    if target:
        print(target)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
