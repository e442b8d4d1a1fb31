"""First-screen screenshots (1280×800, headless Chromium) of the demo's report pages.

    dmaudit demo --out dmaudit-demo --broken-noise
    python benchmarks/report_screenshots.py dmaudit-demo      # -> benchmarks/results/demo_*.png

Takes ``comparison.html`` of the demo's folder and ``report.html`` of each of its runs, as a
reader sees them on opening (no scrolling), and writes them next to the other results. Needs
Chromium (``apt-get install chromium``); nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def screenshot(browser: str, page: Path, out: Path, *, width: int = 1280, height: int = 800):
    """One screenshot of ``page`` at ``width``×``height``."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--virtual-time-budget=10000",
                f"--screenshot={out}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path, help="the demo's --out folder")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    browser = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if browser is None:
        sys.exit("no Chromium found (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    pages = [(args.demo / "comparison.html", "demo_comparison.png")]
    for run in sorted(p for p in args.demo.iterdir() if (p / "report.html").is_file()):
        pages.append((run / "report.html", f"demo_report_{run.name}.png"))
    for page, name in pages:
        if page.is_file():
            print(screenshot(browser, page, args.out / name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
