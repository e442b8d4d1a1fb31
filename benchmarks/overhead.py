"""Cost of auditing: DP-SGD training with and without the auditor, side by side.

    python benchmarks/overhead.py            # quick: 3 rounds of 100 steps
    python benchmarks/overhead.py --full     # 5 rounds of 400 steps

Each round trains the same seeded model once per configuration in a fixed interleaved order
(A B C A B C ...), so machine noise hits every configuration alike; the table reports the median
per-step time ratio against plain training. "capture only" attaches the auditor with no audit
step in range (hooks on every step, snapshots never), which is the cost a user pays between audits.
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


def train(split, *, steps: int, every: int | None, log_dir: str) -> float:
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
            torch.utils.data.TensorDataset(x, y), batch_size=64
        ),
        noise_multiplier=0.05,
        max_grad_norm=1.0,
    )
    auditor = None
    if every is not None:
        auditor = DMAuditor(privacy_engine=engine, log_dir=log_dir, every_n_steps=every)
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
    elapsed = time.perf_counter() - start
    if auditor is not None:
        auditor.close()
    return elapsed / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args(argv)
    rounds, steps = (5, 400) if args.full else (3, 100)
    torch.set_num_threads(2)
    split = mnist_5k_split()
    configs = {
        "plain Opacus": None,
        "capture only": 10**9,
        "audit every 200": 200,
        "audit every 50": 50,
        "audit every 10": 10,
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        train(split, steps=10, every=5, log_dir=f"{tmp}/warmup")  # load LPIPS, warm caches
        for r in range(rounds):
            for name, every in configs.items():
                times[name].append(train(split, steps=steps, every=every, log_dir=f"{tmp}/{r}"))
    base = statistics.median(times["plain Opacus"])
    print(f"steps per run: {steps}, rounds: {rounds}, torch threads: {torch.get_num_threads()}")
    print(f"{'configuration':<18} {'ms/step (median)':>17} {'ratio vs plain':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratios = [t / b for t, b in zip(ts, times["plain Opacus"])]
        print(f"{name:<18} {1e3 * med:>17.2f} {statistics.median(ratios):>14.3f}x")
    print(
        f"(plain Opacus: {1e3 * base:.2f} ms/step; ratio = median over rounds of per-round ratios)"
    )


if __name__ == "__main__":
    main()
