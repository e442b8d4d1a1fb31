"""dmaudit: visual privacy auditing of Opacus DP-SGD training (demo, reports, prior training)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .reconstruct.sampler import SAMPLERS, SamplerSettings

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _noise_multiplier(text: str) -> float:
    value = float(text)
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _quiet_known_warnings() -> None:
    """Silence the warnings the demo causes and understands; explain the one that matters once."""
    # the ImprintBlock is the model's first layer, whose input needs no gradient: Opacus's backward
    # hook on it makes torch say so at every step; harmless.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    print(
        "Note: the demo trains with Opacus's default fast RNG (secure_mode=False), fine for an "
        "audit; train a model you release with secure_mode=True.",
        file=sys.stderr,
    )


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .reconstruct.prior import check_prior_name

    if args.prior != "none":
        check_prior_name(args.prior)  # a missing local prior fails before any run
    _quiet_known_warnings()
    runs = run_demo(
        out_dir=args.out,
        noise_multipliers=args.noise_multipliers,
        steps=args.steps,
        every_n_steps=args.every,
        seed=args.seed,
        prior=None if args.prior == "none" else args.prior,
        sampler=args.sampler,
        progress=not args.quiet,
        broken_noise=args.broken_noise,
    )
    _print_demo(runs, Path(args.out))
    return 0


def _print_table(runs) -> None:
    from .sinks.text import fmt
    from .sinks.verdict import VERDICT_STATUSES

    print(
        f"\n{'sigma':>8} {'epsilon':>10} {'lone found/in batch':>20} {'LPIPS raw':>10} "
        f"{'LPIPS DM':>9} {'success raw':>12} {'DM':>6}  verdict"
    )
    for run in runs:
        s = run.summary
        label = f"{run.noise_multiplier:g}" + ("*" if run.broken else "")
        print(
            f"{label:>8} {fmt(s.epsilon):>10} {f'{s.lone_found}/{s.lone_in_batch}':>20} "
            f"{fmt(s.means.get('lpips_raw'), '.3f'):>10} {fmt(s.means.get('lpips_dm'), '.3f'):>9} "
            f"{fmt(s.success_rate.get('raw'), '.0%'):>12} {fmt(s.success_rate.get('dm'), '.0%'):>6}  "
            f"{VERDICT_STATUSES[s.verdict.status]}"
        )
    print(
        "lone: training images alone in an imprint bin, summed over audits; success: the share "
        "of each audited batch reconstructed to LPIPS <= 0.1 (mean over audits); LPIPS: mean over "
        "the recovered images, lower is closer to the real image"
    )
    if any(run.broken for run in runs):
        print("*: the --broken-noise run, whose optimizer adds half the noise it reports")


def _print_demo(runs, out: Path) -> None:
    _print_table(runs)
    print("\nMechanism checks (every audit: noise, clipping, sampling, accountant):")
    for run in runs:
        print(f"  sigma {run.label}: {_mechanism_line(run.summary)}")
    print("\nVerdicts:")
    for run in runs:
        print(f"  sigma {run.label}: {run.summary.verdict.text}")
    print("\nReports and audit logs (they contain private training images; owner-only):")
    for run in runs:
        print(f"  {run.report}   {run.log}")
    print(f"\nAll runs compared: {out / 'comparison.html'}")
    print(f"TensorBoard:  tensorboard --logdir {out}")


def _mechanism_line(summary) -> str:
    """``name status`` of each mechanism check over the run's audits (its worst status)."""
    from .checks.mechanism import CHECK_NAMES

    parts = [
        f"{name} {summary.checks[name].status}" for name in CHECK_NAMES if name in summary.checks
    ]
    return ", ".join(parts) if parts else "not run"


def _train_prior(args: argparse.Namespace) -> int:
    from .assets.training import load_training_images, train_prior

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
    from .errors import AuditLogError
    from .sinks.report import build_report

    for log_dir in args.log_dirs:
        try:
            json_path, html_path = build_report(log_dir)
        except (OSError, AuditLogError) as err:  # a missing folder, no permission, a full disk
            raise ValueError(str(err)) from None
        print(f"{log_dir}: wrote {json_path} and {html_path}")
    print("The reports contain private training images (owner-only files); share them with care.")
    return 0


def _add_demo(sub, formatter) -> None:
    """``dmaudit demo``: the offline demo."""
    demo = sub.add_parser(
        "demo",
        help="offline demo: audited DP-SGD on real digits",
        description="Train a small CNN with an ImprintBlock on 1000 real MNIST digits with DP-SGD "
        "at several noise multipliers, audit it, denoise with the embedded prior, and write "
        "TensorBoard logs and reports (offline; a few minutes on 2 cores).",
        formatter_class=formatter,
    )
    demo.add_argument(
        "--out",
        default="dmaudit-demo",
        help="output directory; the demo's own sigma_* run folders in it are replaced on a rerun",
    )
    demo.add_argument(
        "--noise-multipliers",
        type=_noise_multiplier,
        nargs="+",
        default=[0.005, 0.02, 0.05, 1.0],
        metavar="SIGMA",
        help="one run per noise multiplier",
    )
    demo.add_argument("--steps", type=_positive_int, default=60, help="optimizer steps per run")
    demo.add_argument("--every", type=_positive_int, default=20, help="audit every N steps")
    demo.add_argument("--seed", type=int, default=0, help="seed of data order, model and noise")
    demo.add_argument(
        "--prior",
        default="embedded:mnist",
        help="diffusion prior: embedded:mnist, a local diffusers directory, a hub id, or 'none'",
    )
    demo.add_argument(
        "--sampler", default=SamplerSettings().name, choices=list(SAMPLERS), help="DM sampler"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument(
        "--broken-noise",
        action="store_true",
        help="add a run whose optimizer secretly adds half the noise: its mechanism checks fail "
        "and its report turns red",
    )
    demo.set_defaults(func=_demo)


def _add_report(sub, formatter) -> None:
    """``dmaudit report``: reports from log dirs."""
    rep = sub.add_parser(
        "report",
        help="build report.json and report.html from an audit log dir (even a crashed one)",
        description="Build report.json and report.html from what an auditor's log dir holds "
        "(audit.jsonl, run.json, images/), also after a crash.",
        formatter_class=formatter,
    )
    rep.add_argument("log_dirs", nargs="+", metavar="LOGDIR", help="an auditor's log_dir")
    rep.set_defaults(func=_report)


def _add_train_prior(sub, formatter) -> None:
    """``dmaudit train-prior``: a prior on offline images."""
    tp = sub.add_parser(
        "train-prior",
        help="train a small diffusion prior on offline images",
        description="Train a diffusers UNet2DModel prior (the embedded priors were made this way).",
        formatter_class=formatter,
    )
    tp.add_argument("--out", required=True, help="output directory (diffusers layout)")
    tp.add_argument(
        "--data",
        default="mnist5k-prior",
        help="mnist5k-prior (default: the MNIST-5k digits the demo never audits) or an .npz "
        "with an 'images' array (N, H, W[, C])",
    )
    tp.add_argument("--steps", type=_positive_int, default=3000, help="training steps")
    tp.add_argument("--batch-size", type=_positive_int, default=64, help="images per step")
    tp.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    tp.add_argument(
        "--sample-size", type=_positive_int, default=32, help="images are zero-padded to this"
    )
    tp.add_argument(
        "--channels",
        type=_positive_int,
        nargs="+",
        default=[32, 64, 64],
        metavar="C",
        help="UNet channels per level",
    )
    tp.add_argument("--layers-per-block", type=_positive_int, default=1, help="UNet depth")
    tp.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    tp.add_argument("--seed", type=int, default=0, help="seed of the training run")
    tp.add_argument("--quiet", action="store_true", help="no progress bar")
    tp.set_defaults(func=_train_prior)


def main(argv: Sequence[str] | None = None) -> int:
    from . import __version__

    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="dmaudit", description=__doc__, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"dmaudit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub, formatter)
    _add_report(sub, formatter)
    _add_train_prior(sub, formatter)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        parser.error(str(err))
    return 1


if __name__ == "__main__":
    sys.exit(main())
