import json
import runpy
import sys

import pytest

from opacus_dmaudit import read_audit_log
from opacus_dmaudit.cli import main
from tests.helpers import REPO


def test_plain_mnist_example_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "plain_mnist.py",
            "--fast",
            "--log-dir",
            str(tmp_path),
            "--noise-multiplier",
            "0.005",
            "--every",
            "2",
        ],
    )
    runpy.run_path(str(REPO / "examples" / "plain_mnist.py"), run_name="__main__")
    records = read_audit_log(tmp_path / "audit.jsonl")
    assert [r.step for r in records] == [2, 4]
    assert records[-1].counts.lone_found >= 10
    assert records[-1].means["ssim_raw"] > 0.5  # σ = 0.005: digits clearly visible


def test_demo_cli_short_run(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--out",
                str(tmp_path),
                "--steps",
                "4",
                "--every",
                "2",
                "--noise-multipliers",
                "0",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "sigma_0/audit.jsonl" in out and "sigma_1/audit.jsonl" in out
    assert "sigma_0/report.html" in out and f"tensorboard --logdir {tmp_path}" in out
    assert (tmp_path / "sigma_1" / "report.html").is_file()
    page = (tmp_path / "comparison.html").read_text()
    assert "sigma_0/report.html" in page and "sigma_1/report.html" in page
    assert "comparison.html" in out
    exact = read_audit_log(tmp_path / "sigma_0" / "audit.jsonl")
    last = exact[-1]
    assert len(exact) == 2 and last.counts.lone_found == last.counts.lone_in_batch > 0
    singles = [im for im in last.images if im.true_count == 1]
    assert singles and min(im.metric("ssim", "raw") for im in singles) > 0.9999
    # the embedded prior ran on every recovered image (σ = 0: t* = 0, nearly the identity)
    assert last.denoiser["prior"] == "embedded:mnist"
    assert min(im.metric("ssim", "dm") for im in singles) > 0.9


@pytest.mark.slow
def test_cifar10_resnet9_example_on_real_cifar10(tmp_path, shared_data):
    """The GroupNorm ResNet-9 example on the real CIFAR-10 test images, with the small RGB prior."""
    example = runpy.run_path(str(REPO / "examples" / "cifar10_resnet9.py"))
    args = ["--log-dir", str(tmp_path), "--prior", "embedded:natural", "--steps", "2"]
    args += ["--every", "2", "--width", "8", "--batch-size", "64", "--noise-multiplier", "0.001"]
    history = example["main"](args)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["imprint_block"]["image_shape"] == [3, 32, 32]
    assert (tmp_path / "report.html").is_file()
    (record,) = history
    assert record.denoiser["prior"] == "embedded:natural"
    assert record.counts.lone_found >= 10
    singles = [im for im in record.images if im.true_count == 1]
    # σ = 0.001: readout noise std ≈ 0.03; the natural-image prior removes most of it
    assert record.mean("lpips", "dm") < record.mean("lpips", "raw")
    assert sum(im.metric("mse", "dm") < im.metric("mse", "raw") for im in singles) > 0.8 * len(
        singles
    )
    # the model is the ResNet-9 the docstring describes: residual blocks, GroupNorm, no BatchNorm
    net = example["resnet9"](width=8)
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"Residual", "GroupNorm"} <= kinds and not any("BatchNorm" in k for k in kinds)
