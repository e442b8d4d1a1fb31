"""The ``dmaudit`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summaries = run_demo(
        out_dir=args.out,
        noise_multipliers=args.noise_multipliers,
        steps=args.steps,
        every_n_steps=args.every,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(
        f"\n{'sigma':>8} {'epsilon':>10} {'found/true singletons':>22} {'SSIM raw':>9} "
        f"{'LPIPS raw':>10}"
    )
    for s in summaries:
        found = f"{_fmt(s['found_singletons'], 'd')}/{_fmt(s['true_singletons'], 'd')}"
        print(
            f"{s['noise_multiplier']:>8g} {s['epsilon']:>10.3g} {found:>22} "
            f"{_fmt(s['ssim_raw'], '.3f'):>9} {_fmt(s['lpips_raw'], '.3f'):>10}"
        )
    print("\nAudit logs (they describe private training images; owner-only permissions):")
    for s in summaries:
        print(f"  {s['log']}")
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
        default=[0.005, 0.05, 1.0],
        metavar="SIGMA",
        help="one run per noise multiplier",
    )
    demo.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    demo.add_argument("--every", type=int, default=20, help="audit every N steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except ValueError as err:
        parser.error(str(err))
    return 1


if __name__ == "__main__":
    sys.exit(main())
