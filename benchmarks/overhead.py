"""Cost of auditing: DP-SGD training with and without the auditor, side by side.

    python benchmarks/overhead.py            # quick: 6 configurations, 1 round of 10 steps, batch 64
    python benchmarks/overhead.py --full     # 8 configurations, 3 rounds of 200 steps, batch 256
    python benchmarks/overhead.py --full --device cuda   # the same on a GPU (named in the table)

The quick mode is a smoke run of the machinery (the test suite runs it); its ratios are too noisy
to quote. Only ``--full`` (or ``--rounds``/``--steps`` chosen to match) gives the table in
``benchmarks/README.md``.

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
so none inherits a heavier predecessor's memory state). The "+ prior" rows include the per-audit
prior-fit check (a few lone images re-noised and restored, see ``opacus_dmaudit.prior_fit``); its
share of each audit's time is the last column. A second table breaks each audited
configuration's audits down by stage (:mod:`opacus_dmaudit.timing`: readout, prior, metrics,
prior fit, κ̂, identification, checks, privacy, sinks; seconds per audit, medians over rounds),
gives the prior's own model calls as a share of an audit, and compares the first and the last
quarter of each run's audits (a per-audit cost that grows with the run's history shows there).
The attach-time work (the prior's fit on public images, κ̂) is broken down apart. The "(bg)" rows score audits in the background
worker (``background=True``) while training goes on. Targets: capture only ≤ 1.02×, an audit
every 50 steps with the prior ≤ 1.25×, every 10 ≤ 2×, the prior's own model calls ≥ 75 % of an
audit, per-audit cost flat in the run's length; audit + prior every 10 in the background ≤ 1.25× where
the machine has spare cores or a GPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from opacus import PrivacyEngine
from torch import nn

from opacus_dmaudit import DMAuditor, ImprintBlock
from opacus_dmaudit.assets.data import mnist_5k_split
from opacus_dmaudit.assets.models import small_cnn
from opacus_dmaudit.timing import STAGE_ORDER

#: Every configuration: name -> (audit every, with the prior, background). ``--full`` runs all.
CONFIGS: dict[str, tuple[int | None, bool, bool]] = {
    "plain Opacus": (None, False, False),
    "plain again (A/A)": (None, False, False),
    "capture only": (10**9, False, False),
    "audit every 10": (10, False, False),
    "+ prior every 50": (50, True, False),
    "+ prior every 10": (10, True, False),
    "+ prior every 50 (bg)": (50, True, True),
    "+ prior every 10 (bg)": (10, True, True),
}
#: The quick mode's rows: one of each kind (plain, A/A, capture, audit, prior, background).
QUICK_CONFIGS = (
    "plain Opacus",
    "plain again (A/A)",
    "capture only",
    "audit every 10",
    "+ prior every 10",
    "+ prior every 10 (bg)",
)
QUICK = {
    "rounds": 1,
    "steps": 10,
    "batch_size": 64,
    "configs": QUICK_CONFIGS,
    "max_images": 4,
    "attach_checks": False,
}
FULL = {
    "rounds": 3,
    "steps": 200,
    "batch_size": 256,
    "configs": tuple(CONFIGS),
    "max_images": None,
    "attach_checks": True,
}


def train(
    split,
    *,
    steps: int,
    every: int | None,
    log_dir: str,
    prior=None,
    background: bool = False,
    batch_size: int = 256,
    sigma: float = 0.02,
    device: str = "cpu",
    max_images: int | None = None,
    attach_checks: bool = True,
) -> dict[str, float | list[float]]:
    """One seeded run (every=None: no auditor): wall and CPU seconds per optimizer step, end to
    end, and the wall time of each step (forward, backward and ``step``, audit included). The
    auditor's construction and ``attach`` (with ``attach_checks``: the prior-fit check and the
    baseline κ̂ on the public images kept by ``calibrate``) are timed apart, not in the run."""
    torch.manual_seed(0)
    x, y = split["private"]
    block = ImprintBlock(image_shape=(1, 28, 28), num_bins=128).calibrate(split["prior"][0])
    if not attach_checks:
        block.public_sample = None  # no public images: no attach-time prior fit, no κ̂
    model = nn.Sequential(block, small_cnn(1, 28)).to(device)  # the demo's digit CNN
    cuda = torch.device(device).type == "cuda"
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
    attach = time.perf_counter()
    if every is not None:
        auditor = DMAuditor(
            privacy_engine=engine,
            log_dir=log_dir,
            every_n_steps=every,
            prior=prior,
            background=background,
            max_images=max_images,
        )
        auditor.attach(opt)
    attach = time.perf_counter() - attach
    done = 0
    step_times = []
    start, cpu = time.perf_counter(), time.process_time()
    while done < steps:
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            done += 1
            if done == steps:
                break
    if auditor is not None:
        auditor.close()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps
    # the per-audit prior-fit check's share of each audit's time (prior_fit.audit_fit)
    fit_share = [
        c.values["seconds"] / r.audit_seconds
        for r in (auditor.history if auditor is not None else [])
        for c in r.checks
        if c.name == "prior_fit_audit" and r.audit_seconds
    ]
    audits = len(auditor.history) if auditor is not None else 0
    return {
        "stages": [t.to_json() for t in auditor.stage_times] if auditor is not None else [],
        "attach_stages": (
            auditor.attach_times.to_json()
            if auditor is not None and auditor.attach_times is not None
            else {}
        ),
        "wall": wall,
        "cpu": cpu,
        "steps": step_times,
        "fit_share": fit_share,
        "audits": audits,
        "attach": attach,
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


def print_table(times: dict[str, list[dict]], *, file=sys.stdout) -> None:
    """The table: per configuration, medians over the rounds so far of each round's ratios."""
    out = functools.partial(print, file=file)
    out(
        f"{'configuration':<22} {'ms/step (median)':>17} {'wall ratio':>11} {'CPU ratio':>10} "
        f"{'non-audit steps':>16} {'audits':>7} {'prior fit/audit':>16} {'attach s':>9}"
    )
    ratio, steady = {}, {}
    base = times["plain Opacus"]
    for name, runs in times.items():
        every = CONFIGS[name][0]
        ratio[name] = statistics.median(r["wall"] / b["wall"] for r, b in zip(runs, base))
        cpu = statistics.median(r["cpu"] / b["cpu"] for r, b in zip(runs, base))
        steady[name] = statistics.median(non_audit_ratio(r, b, every) for r, b in zip(runs, base))
        ms = 1e3 * statistics.median(r["wall"] for r in runs)
        audits = statistics.median(r["audits"] for r in runs)
        shares = [s for r in runs for s in r["fit_share"]]
        fit = f"{statistics.median(shares):.1%}" if shares else "-"
        attach = f"{statistics.median(r['attach'] for r in runs):.2f}" if every else "-"
        out(
            f"{name:<22} {ms:>17.2f} {ratio[name]:>10.3f}x {cpu:>9.3f}x {steady[name]:>15.3f}x "
            f"{audits:>7g} {fit:>16} {attach:>9}"
        )
    out(
        "(ratios: median over rounds of each round's ratio to plain Opacus; wall and CPU: whole\n"
        " runs; non-audit steps: median step-by-step ratio over the steps that neither audit nor\n"
        " follow an audit; the A/A row is plain Opacus again, the noise floor of this machine;\n"
        " audits: records written per run (background runs: all drained by close());\n"
        " (bg): background=True, audits scored by a worker thread beside training; prior fit/audit:\n"
        " median share of an audit's time spent re-noising and restoring lone images, prior_fit_audit;\n"
        " attach s: DMAuditor(...) + attach(), once per run before the first step, not in the ratios)"
    )

    def at(table: dict[str, float], name: str) -> str:
        return f"{table[name]:.3f}x" if name in table else "n/a"

    out(
        f"targets: capture only {at(steady, 'capture only')} on non-audit steps, "
        f"{at(ratio, 'capture only')} whole run (<= 1.02x); "
        f"audit every 50 with the prior {at(ratio, '+ prior every 50')} (<= 1.25x); "
        f"every 10 with the prior {at(ratio, '+ prior every 10')} synchronous (<= 2x), "
        f"{at(ratio, '+ prior every 10 (bg)')} in the background (<= 1.25x with spare cores)"
    )


def _stage_medians(runs: list[dict], key: str = "stages") -> dict[str, float]:
    """Per stage: the median over runs of the mean seconds per audit (or of the attach work)."""
    per_run = []
    for r in runs:
        audits = r[key] if key == "stages" else [r[key]] if r[key] else []
        if audits:
            names = {n for a in audits for n in a}
            per_run.append({n: statistics.fmean(a.get(n, 0.0) for a in audits) for n in names})
    if not per_run:
        return {}
    names = {n for run in per_run for n in run}
    return {n: statistics.median(run.get(n, 0.0) for run in per_run) for n in names}


def _quarters(runs: list[dict]) -> tuple[float, float] | None:
    """Median over runs of the mean audit seconds in the first and the last quarter of audits."""
    first, last = [], []
    for r in runs:
        totals = [a["total"] for a in r["stages"]]
        if len(totals) >= 4:
            q = len(totals) // 4
            first.append(statistics.fmean(totals[:q]))
            last.append(statistics.fmean(totals[-q:]))
    if not first:
        return None
    return statistics.median(first), statistics.median(last)


def print_stages(times: dict[str, list[dict]], *, device: str, file=sys.stdout) -> None:
    """Where an audit's time goes, per audited configuration (seconds per audit)."""
    out = functools.partial(print, file=file)
    cols = [s for s in STAGE_ORDER]
    out(f"per-audit cost by stage, seconds per audit (device {device}):")
    out(
        f"{'configuration':<22} "
        + " ".join(f"{c:>8}" for c in cols + ["total"])
        + "  model%  q1→q4 s"
    )
    for name, runs in times.items():
        med = _stage_medians(runs)
        if not med:
            continue
        total = med.get("total", 0.0)
        share = med.get("model calls", 0.0) / total if total else float("nan")
        quarters = _quarters(runs)
        flat = f"{quarters[0]:.2f}→{quarters[1]:.2f}" if quarters else "-"
        vals = " ".join(f"{med.get(c, 0.0):>8.3f}" for c in cols + ["total"])
        out(f"  {name:<22} {vals} {share:>6.0%}  {flat}")  # indented: not a ratio row
    attach = _stage_medians(times.get("+ prior every 50", []), "attach_stages")
    if attach:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(attach.items()) if v >= 0.005)
        out(f"attach-time work (+ prior every 50), seconds: {parts}")
    out(
        "(exclusive seconds per stage: a stage nested in another counts only towards the inner one;\n"
        " readout: reading the bins out (shadow simulation included); prior: the DM reconstruction;\n"
        " privacy: ε, κ, bounds and the empirical estimates; other: time in no stage; model%: the\n"
        " prior's own model calls as a share of an audit (target >= 75%); q1→q4: mean audit seconds\n"
        " in the first and last quarter of a run's audits (flat: the cost does not grow with history))"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="all configurations, 5 x 200 steps")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, help="expected (Poisson) batch")
    parser.add_argument("--sigma", type=float, default=0.02)
    parser.add_argument("--prior", default="embedded:mnist", help="the default prior")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model, the batches and the prior run (default: CUDA when available)",
    )
    parser.add_argument(
        "--max-images", type=int, help="the auditor's max_images (quick: 4, full: all)"
    )
    parser.add_argument(
        "--attach-checks",
        action=argparse.BooleanOptionalAction,
        help="keep the public images for the attach-time prior fit and κ̂ (quick: off, full: on)",
    )
    parser.add_argument(
        "--configs", nargs="+", choices=list(CONFIGS), help="rows to run (plain Opacus always)"
    )
    args = parser.parse_args(argv)
    settings = dict(FULL if args.full else QUICK)
    rounds = args.rounds or settings["rounds"]
    steps = args.steps or settings["steps"]
    batch_size = args.batch_size or settings["batch_size"]
    max_images = args.max_images or settings["max_images"]
    attach_checks = settings["attach_checks"] if args.attach_checks is None else args.attach_checks
    chosen = set(args.configs or settings["configs"]) | {"plain Opacus"}
    names = [name for name in CONFIGS if name in chosen]
    torch.set_num_threads(2)
    split = mnist_5k_split()
    from opacus_dmaudit import DiffusionPrior

    prior = DiffusionPrior.from_pretrained(args.prior, device=args.device)
    kw = dict(
        batch_size=batch_size,
        sigma=args.sigma,
        device=args.device,
        max_images=max_images,
        attach_checks=attach_checks,
    )
    times: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        warm = 10 if args.full else 5
        train(split, steps=warm, every=5, log_dir=f"{tmp}/warmup", prior=prior, **kw)  # warm up
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
                every, with_prior, bg = CONFIGS[name]
                log_dir = f"{tmp}/{r}-{len(times[name])}-{name.replace(' ', '_')}"
                # settle: a few untimed plain steps first, so no run inherits the memory state
                # of a heavier predecessor (the rotation keeps the cyclic order, so without this
                # plain Opacus always follows "+ prior every 10" and pays for it)
                gc.collect()
                train(split, steps=5, every=None, log_dir=f"{log_dir}-settle", **kw)
                times[name].append(
                    train(
                        split,
                        steps=steps,
                        every=every,
                        log_dir=log_dir,
                        prior=prior if with_prior else None,
                        background=bg,
                        **kw,
                    )
                )
            if rounds > 1:  # progress, so an interrupted run still has its rounds so far
                print(f"after round {r + 1} of {rounds}:", file=sys.stderr)
                print_table(times, file=sys.stderr)
    print(
        f"device {args.device}; steps per run: {steps}, rounds: {rounds}, batch {batch_size}, "
        f"σ = {args.sigma}, "
        f"torch threads: {torch.get_num_threads()}, max_images {max_images or 'all'}, "
        f"attach-time checks {'on' if attach_checks else 'off'}"
    )
    print_table(times)
    print_stages(times, device=args.device)
    cores = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "none"
    print(f"hardware: device {args.device}; {cores}; GPU: {gpu}; torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
