"""report.html and comparison.html laid out by a real browser (headless Chromium at 1280×800).

A probe script (added by the test, not by the pages) writes the positions of the key elements
and of every image into the DOM once the page has loaded; ``--dump-dom`` hands them back.
"""

import html
import json
import re
import subprocess

import pytest

from opacus_dmaudit.sinks.report import build_comparison
from tests.helpers import audited_run
from tests.sinks.test_report import _chromium

WIDTH, HEIGHT = 1280, 800

PROBE = """<script>window.addEventListener('load',()=>{
const box=e=>{if(!e)return null;const r=e.getBoundingClientRect();
return {top:r.top,bottom:r.bottom,left:r.left,right:r.right,w:r.width,h:r.height};};
const cap=i=>{const f=i.closest('figure');const c=f&&f.querySelector(':scope>figcaption');
return c?c.textContent.trim():'';};
const out={vw:window.innerWidth,vh:window.innerHeight,
scroll:document.documentElement.scrollWidth,client:document.documentElement.clientWidth,
ids:Object.fromEntries(['headline','key-numbers','images','ladder','best','missed','sentence']
.map(k=>[k,box(document.getElementById(k))])),
imgs:[...document.images].map(i=>({alt:i.alt,caption:cap(i),box:box(i),
ok:i.complete&&i.naturalWidth>0,section:(i.closest('section,details')||{}).id||''}))};
const pre=document.createElement('pre');pre.id='probe';pre.textContent=JSON.stringify(out);
document.body.appendChild(pre);});</script></body>"""


def layout(browser: str, page_html: str, tmp_path, name: str) -> dict:
    """Render ``page_html`` in headless Chromium at 1280×800; the probe's measurements."""
    page = tmp_path / f"{name}.probe.html"
    page.write_text(page_html.replace("</body>", PROBE, 1), encoding="utf-8")
    out = subprocess.run(
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
            f"--user-data-dir={tmp_path / ('profile-' + name)}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", out, re.S)
    assert found, f"the probe did not run; Chromium printed: {out[:500]}"
    return json.loads(html.unescape(found.group(1)))


def on_first_screen(box: dict | None, probe: dict) -> bool:
    return box is not None and box["h"] > 0 and 0 <= box["top"] and box["bottom"] <= probe["vh"]


def assert_readable(probe: dict) -> None:
    """Nothing overflows sideways; every image decoded and has alt text and a visible caption."""
    # the viewport of a 1280×800 window (headless Chromium keeps room for the browser's frame)
    assert probe["vw"] == WIDTH and 600 <= probe["vh"] <= HEIGHT
    assert probe["scroll"] <= probe["client"], "the page scrolls sideways"
    for img in probe["imgs"]:
        assert img["ok"], f"broken image {img['alt']!r}"
        assert img["alt"].strip() and img["caption"], f"image without a caption: {img}"
        box = img["box"]
        if box["w"] > 0:  # laid out (not inside a closed <details>)
            assert box["right"] <= probe["vw"] + 0.5, f"image past the right edge: {img}"


@pytest.fixture(scope="module")
def two_runs(mnist5k, tmp_path_factory):
    """The same seed and data at a σ that leaks and at one that hides everything."""
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for sigma in (0.02, 1.0):
        auditor, _ = audited_run(
            mnist5k,
            root / f"sigma_{sigma:g}",
            sigma=sigma,
            steps=2,
            every=2,
            metrics=("lpips",),
            prior="embedded:mnist",
        )
        auditor.close()
        dirs.append(root / f"sigma_{sigma:g}")
    return root, dirs


def test_report_shows_verdict_numbers_and_images_on_the_first_screen(two_runs, tmp_path):
    browser = _chromium()
    _, (leaky, _) = two_runs
    probe = layout(browser, (leaky / "report.html").read_text(), tmp_path, "report")
    assert_readable(probe)
    for key in ("headline", "key-numbers", "best"):
        assert on_first_screen(probe["ids"][key], probe), f"#{key} is not on the first screen"
    first = [
        i for i in probe["imgs"] if i["section"] == "images" and on_first_screen(i["box"], probe)
    ]
    rows = {i["alt"].split(",")[0] for i in first}
    assert {"truth", "raw readout", "DM"} <= rows  # truth / raw / DM side by side, above the fold
    assert len(first) >= 6  # at least two audited images' panels


def test_report_of_a_run_with_nothing_recovered_shows_truth_beside_raw(two_runs, tmp_path):
    browser = _chromium()
    _, (_, hidden) = two_runs
    page = (hidden / "report.html").read_text()
    probe = layout(browser, page, tmp_path, "hidden")
    assert_readable(probe)
    assert on_first_screen(probe["ids"]["missed"], probe)
    first = [
        i for i in probe["imgs"] if i["section"] == "images" and on_first_screen(i["box"], probe)
    ]
    assert {i["alt"].split(",")[0] for i in first} == {"truth", "raw readout"}


def test_comparison_shows_the_same_images_across_noise_on_the_first_screen(two_runs, tmp_path):
    browser = _chromium()
    root, dirs = two_runs
    path = build_comparison(root, dirs)
    page = path.read_text()
    assert "closest equivalent" not in page.split("<section id='ladder'>")[1].split("</section>")[0]
    probe = layout(browser, page, tmp_path, "comparison")
    assert_readable(probe)
    assert on_first_screen(probe["ids"]["ladder"] and probe["ids"]["sentence"], probe)
    first = [
        i for i in probe["imgs"] if i["section"] == "ladder" and on_first_screen(i["box"], probe)
    ]
    # a column per run, rows truth / raw readout / DM (the hidden run has no DM: not detected)
    assert {i["alt"] for i in first} >= {
        "truth, sigma_0.02",
        "raw readout, sigma_0.02",
        "DM, sigma_0.02",
        "truth, sigma_1",
        "raw readout, sigma_1",
    }
    ladder = page.split("<section id='ladder'>")[1].split("</section>")[0]
    assert "not detected" in ladder and "σ 0.02" in ladder and "σ 1" in ladder
