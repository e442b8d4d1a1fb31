"""The ``dmaudit`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import SAMPLER_NAMES

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .summary import VERDICT_STATUSES, fmt

    runs = run_demo(
        out_dir=args.out,
        noise_multipliers=args.noise_multipliers,
        steps=args.steps,
        every_n_steps=args.every,
        seed=args.seed,
        prior=None if args.prior == "none" else args.prior,
        sampler=args.sampler,
        progress=not args.quiet,
    )
    print(
        f"\n{'sigma':>8} {'epsilon':>10} {'lone found/in batch':>20} {'LPIPS raw':>10} "
        f"{'LPIPS DM':>9} {'success raw':>12} {'DM':>6}  verdict"
    )
    for run in runs:
        s = run["summary"]
        rates, means = s.get("mean_success_rate") or {}, s.get("mean_metrics") or {}
        found = f"{s.get('found_singletons', 0)}/{s.get('true_singletons', 0)}"
        print(
            f"{run['noise_multiplier']:>8g} {fmt(s.get('final_epsilon')):>10} {found:>20} "
            f"{fmt(means.get('lpips_raw'), '.3f'):>10} {fmt(means.get('lpips_dm'), '.3f'):>9} "
            f"{fmt(rates.get('raw'), '.0%'):>12} {fmt(rates.get('dm'), '.0%'):>6}  "
            f"{VERDICT_STATUSES[run['verdict']['status']]}"
        )
    print(
        "lone: training images alone in an imprint bin, summed over audits; success: the share "
        "of each audited batch reconstructed to LPIPS <= 0.1 (mean over audits); LPIPS: mean over "
        "the recovered images, lower is closer to the real image"
    )
    print("\nVerdicts:")
    for run in runs:
        print(f"  sigma {run['noise_multiplier']:g}: {run['verdict']['text']}")
    print("\nReports and audit logs (they contain private training images; owner-only):")
    for run in runs:
        run_dir = Path(run["log"]).parent
        print(f"  {run_dir / 'report.html'}   {run['log']}")
    print(f"\nAll runs compared: {Path(args.out) / 'comparison.html'}")
    print(f"TensorBoard:  tensorboard --logdir {args.out}")
    return 0


def _train_prior(args: argparse.Namespace) -> int:
    from .prior_training import load_training_images, train_prior

    images, description = load_training_images(args.data)
    record = train_prior(
        images,
        args.out,
        sample_size=args.sample_size,
        block_out_channels=args.channels,
        layers_per_block=args.layers_per_block,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        bf16=not args.fp32,
        seed=args.seed,
        data_description=description,
        progress=not args.quiet,
    )
    print(
        f"saved {record['parameters'] / 1e6:.2f}M-parameter prior to {args.out} after "
        f"{record['steps']} steps in {record['wall_seconds']:.0f} s "
        f"(final loss {record['final_loss']:.4f})"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from .audit_log import AuditLogError
    from .report import build_report

    for log_dir in args.log_dirs:
        try:
            json_path, html_path = build_report(log_dir)
        except (FileNotFoundError, PermissionError, AuditLogError) as err:
            raise ValueError(str(err)) from None
        print(f"{log_dir}: wrote {json_path} and {html_path}")
    print("The reports contain private training images (owner-only files); share them with care.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dmaudit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo: audited DP-SGD on real digits")
    demo.add_argument("--out", default="dmaudit-demo", help="output directory")
    demo.add_argument(
        "--noise-multipliers",
        type=float,
        nargs="+",
        default=[0.005, 0.02, 0.05, 1.0],
        metavar="SIGMA",
        help="one run per noise multiplier",
    )
    demo.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    demo.add_argument("--every", type=int, default=20, help="audit every N steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--prior",
        default="embedded:mnist",
        help="diffusion prior: embedded:mnist (default), a local diffusers directory, a hub id, "
        "or 'none'",
    )
    demo.add_argument("--sampler", default="ddim", choices=list(SAMPLER_NAMES), help="DM sampler")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    rep = sub.add_parser(
        "report",
        help="build report.json and report.html from an audit log dir (even a crashed one)",
    )
    rep.add_argument("log_dirs", nargs="+", metavar="LOGDIR")
    rep.set_defaults(func=_report)

    tp = sub.add_parser("train-prior", help="train a small diffusion prior on offline images")
    tp.add_argument("--out", required=True, help="output directory (diffusers layout)")
    tp.add_argument(
        "--data",
        default="mnist5k-prior",
        help="mnist5k-prior (default: the MNIST-5k digits the demo never audits) or an .npz "
        "with an 'images' array (N, H, W[, C])",
    )
    tp.add_argument("--steps", type=int, default=3000)
    tp.add_argument("--batch-size", type=int, default=64)
    tp.add_argument("--lr", type=float, default=1e-3)
    tp.add_argument("--sample-size", type=int, default=32, help="images are zero-padded to this")
    tp.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64], metavar="C")
    tp.add_argument("--layers-per-block", type=int, default=1)
    tp.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--quiet", action="store_true", help="no progress bar")
    tp.set_defaults(func=_train_prior)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except ValueError as err:
        parser.error(str(err))
    return 1


if __name__ == "__main__":
    sys.exit(main())
