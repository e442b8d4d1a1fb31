"""Cost of auditing: DP-SGD training with and without the auditor, side by side.

    python benchmarks/overhead.py            # quick: 3 rounds of 100 steps
    python benchmarks/overhead.py --full     # 3 rounds of 200 steps

Each round trains the same seeded model once per configuration, interleaved (A B C A B C ...,
the starting configuration rotating by one each round), so machine noise hits every
configuration alike; the table reports the median
per-step time ratio against plain training, whole runs end to end (audits, log, TensorBoard and
the closing report included). "capture only" attaches the auditor with no audit step in range
(hooks on every step, snapshots never), which is the cost a user pays between audits. The "+ prior"
rows denoise every recovered image with the default embedded prior (DDIM-20). Targets: capture
only ≤ 1.02×, an audit every 50 steps with the prior ≤ 1.25×.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opacus_dmaudit import DMAuditor, ImprintBlock  # noqa: E402
from opacus_dmaudit.data import mnist_5k_split  # noqa: E402
from opacus_dmaudit.demo import digit_cnn  # noqa: E402


def train(
    split,
    *,
    steps: int,
    every: int | None,
    log_dir: str,
    prior=None,
    batch_size: int = 256,
    sigma: float = 0.02,
) -> float:
    """Seconds per optimizer step of one seeded run (every=None: no auditor)."""
    torch.manual_seed(0)
    x, y = split["private"]
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=128).calibrate(split["prior"][0])
    model = nn.Sequential(block, digit_cnn())
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=batch_size
        ),
        noise_multiplier=sigma,
        max_grad_norm=1.0,
    )
    auditor = None
    if every is not None:
        auditor = DMAuditor(
            privacy_engine=engine, log_dir=log_dir, every_n_steps=every, prior=prior
        )
        auditor.attach(opt)
    done = 0
    start = time.perf_counter()
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    if auditor is not None:
        auditor.close()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch")
    parser.add_argument("--sigma", type=float, default=0.02)
    parser.add_argument("--prior", default="embedded:mnist", help="the default prior")
    args = parser.parse_args(argv)
    rounds = args.rounds or 3
    steps = args.steps or (200 if args.full else 100)
    torch.set_num_threads(2)
    split = mnist_5k_split()
    from opacus_dmaudit import DiffusionPrior

    prior = DiffusionPrior.from_pretrained(args.prior)
    configs = {
        "plain Opacus": (None, None),
        "capture only": (10**9, None),
        "audit every 200": (200, None),
        "audit every 50": (50, None),
        "audit every 10": (10, None),
        "+ prior every 200": (200, prior),
        "+ prior every 50": (50, prior),
        "+ prior every 10": (10, prior),
    }
    kw = dict(batch_size=args.batch_size, sigma=args.sigma)
    times: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        train(split, steps=10, every=5, log_dir=f"{tmp}/warmup", prior=prior, **kw)  # warm up
        names = list(configs)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
                every, pr = configs[name]
                log_dir = f"{tmp}/{r}-{len(times[name])}-{name.replace(' ', '_')}"
                times[name].append(
                    train(split, steps=steps, every=every, log_dir=log_dir, prior=pr, **kw)
                )
    print(
        f"steps per run: {steps}, rounds: {rounds}, batch {args.batch_size}, σ = {args.sigma}, "
        f"torch threads: {torch.get_num_threads()}"
    )
    print(f"{'configuration':<18} {'ms/step (median)':>17} {'ratio vs plain':>15}")
    ratio = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["plain Opacus"])]
        ratio[name] = statistics.median(ratios)
        print(f"{name:<18} {1e3 * statistics.median(ts):>17.2f} {ratio[name]:>14.3f}x")
    print("(ratio = median over rounds of the per-round ratio to plain Opacus)")
    print(
        f"targets: capture only {ratio['capture only']:.3f}x (<= 1.02x), "
        f"audit every 50 with the prior {ratio['+ prior every 50']:.3f}x (<= 1.25x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
