"""Cost of auditing: DP-SGD training with and without the auditor, side by side.

    python benchmarks/overhead.py            # quick: 3 rounds of 100 steps
    python benchmarks/overhead.py --full     # 5 rounds of 200 steps

Each round trains the same seeded model once per configuration, interleaved (A B C A B C ...,
the starting configuration rotating by one each round), so machine noise hits every configuration
alike. Per configuration the table reports medians over rounds of each round's ratio to plain
Opacus: the wall time of whole runs end to end (audits, log, TensorBoard and the closing report
included), the process's CPU time (which other tenants of a shared machine disturb less), and the
step-by-step time of the steps that neither audit nor follow an audit (the same seeded batches,
paired), which is the cost a user pays between audits. "capture only" attaches the auditor with no
audit step in range (hooks on every step, snapshots never). The "+ prior" rows denoise every
recovered image with the default embedded prior and the auditor's default sampler (DDIM, at most
20 steps of at least 20 timesteps each). A second plain configuration (A/A) shows how far two
identical runs differ on this machine (every timed run is preceded by a few untimed plain steps,
so none inherits a heavier predecessor's memory state). Targets: capture only ≤ 1.02×, an audit
every 50 steps with the prior ≤ 1.25×.
"""

from __future__ import annotations

import argparse
import gc
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
) -> dict[str, float | list[float]]:
    """One seeded run (every=None: no auditor): wall and CPU seconds per optimizer step, end to
    end, and the wall time of each step (forward, backward and ``step``, audit included)."""
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
    step_times = []
    start, cpu = time.perf_counter(), time.process_time()
    while done < steps:
        for xb, yb in loader:
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            done += 1
            if done == steps:
                break
    if auditor is not None:
        auditor.close()
    return {
        "wall": (time.perf_counter() - start) / steps,
        "cpu": (time.process_time() - cpu) / steps,
        "steps": step_times,
    }


def non_audit_ratio(run: dict, base: dict, every: int | None) -> float:
    """Median over the steps that did not audit of the step-by-step time ratio to ``base`` (the
    same seeded batches); the step after an audit is left out too (its caches are cold)."""
    ratios = [
        t / b
        for i, (t, b) in enumerate(zip(run["steps"], base["steps"]), start=1)
        if every is None or (i % every != 0 and (i - 1) % every != 0)
    ]
    return statistics.median(ratios)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch")
    parser.add_argument("--sigma", type=float, default=0.02)
    parser.add_argument("--prior", default="embedded:mnist", help="the default prior")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.full else 3)
    steps = args.steps or (200 if args.full else 100)
    torch.set_num_threads(2)
    split = mnist_5k_split()
    from opacus_dmaudit import DiffusionPrior

    prior = DiffusionPrior.from_pretrained(args.prior)
    configs = {
        "plain Opacus": (None, None),
        "plain again (A/A)": (None, None),
        "capture only": (10**9, None),
        "audit every 200": (200, None),
        "audit every 50": (50, None),
        "audit every 10": (10, None),
        "+ prior every 200": (200, prior),
        "+ prior every 50": (50, prior),
        "+ prior every 10": (10, prior),
    }
    kw = dict(batch_size=args.batch_size, sigma=args.sigma)
    times: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        train(split, steps=10, every=5, log_dir=f"{tmp}/warmup", prior=prior, **kw)  # warm up
        names = list(configs)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
                every, pr = configs[name]
                log_dir = f"{tmp}/{r}-{len(times[name])}-{name.replace(' ', '_')}"
                # settle: a few untimed plain steps first, so no run inherits the memory state
                # of a heavier predecessor (the rotation keeps the cyclic order, so without this
                # plain Opacus always follows "+ prior every 10" and pays for it)
                gc.collect()
                train(split, steps=5, every=None, log_dir=f"{log_dir}-settle", **kw)
                times[name].append(
                    train(split, steps=steps, every=every, log_dir=log_dir, prior=pr, **kw)
                )
    print(
        f"steps per run: {steps}, rounds: {rounds}, batch {args.batch_size}, σ = {args.sigma}, "
        f"torch threads: {torch.get_num_threads()}"
    )
    print(
        f"{'configuration':<18} {'ms/step (median)':>17} {'wall ratio':>11} {'CPU ratio':>10} "
        f"{'non-audit steps':>16}"
    )
    ratio, steady = {}, {}
    base = times["plain Opacus"]
    for name, runs in times.items():
        every = configs[name][0]
        ratio[name] = statistics.median(r["wall"] / b["wall"] for r, b in zip(runs, base))
        cpu = statistics.median(r["cpu"] / b["cpu"] for r, b in zip(runs, base))
        steady[name] = statistics.median(non_audit_ratio(r, b, every) for r, b in zip(runs, base))
        ms = 1e3 * statistics.median(r["wall"] for r in runs)
        print(f"{name:<18} {ms:>17.2f} {ratio[name]:>10.3f}x {cpu:>9.3f}x {steady[name]:>15.3f}x")
    print(
        "(ratios: median over rounds of each round's ratio to plain Opacus; wall and CPU: whole\n"
        " runs; non-audit steps: median step-by-step ratio over the steps that neither audit nor\n"
        " follow an audit; the A/A row is plain Opacus again, the noise floor of this machine)"
    )
    print(
        f"targets: capture only {steady['capture only']:.3f}x on non-audit steps, "
        f"{ratio['capture only']:.3f}x whole run (<= 1.02x); "
        f"audit every 50 with the prior {ratio['+ prior every 50']:.3f}x (<= 1.25x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
