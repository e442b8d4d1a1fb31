"""AuditConfig: every bad setting fails at construction with a message that says what to do."""

import dataclasses
import json

import pytest
import torch

from opacus_dmaudit.config import DEFAULT_SUCCESS_THRESHOLDS, AuditConfig


def test_defaults_judge_success_by_lpips_at_its_threshold():
    config = AuditConfig()
    assert config.metrics == ("mse", "psnr", "ssim", "lpips")
    assert (config.success_metric, config.success_threshold) == ("lpips", 0.1)
    criterion = config.success_criterion
    assert (criterion.metric, criterion.threshold, criterion.higher_is_better) == (
        "lpips",
        0.1,
        False,
    )


@pytest.mark.parametrize(
    "metrics,metric", [(("mse", "ssim"), "ssim"), (("psnr", "mse"), "psnr"), (("mse",), "mse")]
)
def test_without_lpips_the_next_metric_judges_success(metrics, metric):
    config = AuditConfig(metrics=metrics)
    assert config.success_metric == metric
    assert config.success_threshold == DEFAULT_SUCCESS_THRESHOLDS[metric]
    assert config.success_criterion.higher_is_better == (metric in ("ssim", "psnr"))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"every_n_steps": 0}, r"every_n_steps must be a positive integer, got 0"),
        ({"every_n_steps": True}, r"every_n_steps must be a positive integer, got True"),
        ({"every_n_steps": 2.5}, r"every_n_steps must be a positive integer, got 2.5"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
        ({"delta": "1e-5"}, r"delta must be in \(0, 1\), got '1e-5'"),  # not a number
        ({"delta": float("nan")}, r"delta must be in \(0, 1\), got nan"),
        ({"metrics": "lpips"}, r"metrics must be a sequence of names, got the string 'lpips'"),
        ({"metrics": ("psnr", "fid")}, r"unknown metrics \['fid'\]; choose from"),
        ({"metrics": ()}, r"unknown metrics \[\]; choose from"),
        ({"lpips_net": "squeeze"}, r"lpips_net must be 'vgg' or 'alex', got 'squeeze'"),
        ({"false_bins_per_audit": 0}, r"false_bins_per_audit must be in \(0, 1\)"),
        ({"occupancy_z": 0.0}, r"occupancy_z must be positive or None"),
        ({"max_images": 0}, r"max_images must be a positive integer"),
        ({"sampler": "euler"}, r"sampler must be one of \('ddim', "),
        (
            {"metrics": ("mse",), "success_metric": "ssim"},
            r"success_metric 'ssim' must be one of the metrics \('mse',\)",
        ),
        ({"success_threshold": float("inf")}, r"success_threshold must be finite"),
        ({"kappa": 1.0}, r"kappa must be in \(0, 1\) or None"),
        ({"shadow": "yes"}, r"shadow must be True, False or a ShadowAdversary"),
        ({"prior_fit_public": -1}, r"prior_fit_public must be a non-negative integer"),
        ({"prior_fit_audit": 1.5}, r"prior_fit_audit must be a non-negative integer"),
        ({"existing": "append"}, r"existing must be one of \('error', 'overwrite'\)"),
        ({"seed": "0"}, r"seed must be an integer"),
        ({"public": torch.rand(5, 28, 28)}, r"public must be a \(N, C, H, W\) tensor"),
        ({"public": torch.rand(0, 1, 28, 28)}, r"public must be a \(N, C, H, W\) tensor"),
    ],
)
def test_bad_settings_fail_at_construction_with_their_reason(settings, message):
    with pytest.raises(ValueError, match=message):
        AuditConfig(**settings)


@pytest.mark.parametrize("name", ["sampler_steps", "sampler_min_stride"])
def test_release_0_1_sampler_keywords_are_checked_under_their_own_name(name):
    # no longer fields (AuditConfig.sampler holds them) but still keywords of from_kwargs,
    # which DMAuditor and the callbacks use
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer"):
        AuditConfig.from_kwargs({name: 0})


def test_a_prior_that_can_only_be_a_missing_local_folder_fails_at_once(tmp_path):
    missing = tmp_path / "my-prior"
    with pytest.raises(FileNotFoundError, match="no such directory.*a hub id like"):
        AuditConfig(prior=str(missing))
    missing.mkdir()
    assert AuditConfig(prior=str(missing)).prior == str(missing)  # present: accepted as given


def test_the_old_sampler_name_ddpm_is_renamed_with_a_warning():
    with pytest.warns(DeprecationWarning, match="now called 'ancestral'"):
        config = AuditConfig(sampler="ddpm")
    assert config.sampler.name == "ancestral"


def test_settings_are_frozen_and_keyword_only():
    config = AuditConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.every_n_steps = 5
    with pytest.raises(TypeError):
        AuditConfig(5)


def test_from_kwargs_names_the_misspelt_keyword_and_suggests_the_right_one():
    with pytest.raises(
        TypeError,
        match=r"^DMAuditor got an unexpected keyword argument 'every_n_step'; "
        r"did you mean 'every_n_steps'\?$",
    ):
        AuditConfig.from_kwargs({"every_n_step": 5})
    with pytest.raises(TypeError, match=r"^DMAuditCallback got .* 'sampler_step'; did you mean"):
        AuditConfig.from_kwargs({"sampler_step": 5}, where="DMAuditCallback")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'colour'$"):  # no guess
        AuditConfig.from_kwargs({"colour": "red"})
    config = AuditConfig.from_kwargs({"every_n_steps": 5, "metrics": ["mse"]})
    assert config == AuditConfig(every_n_steps=5, metrics=("mse",))


def test_replace_copies_changes_and_validates_again():
    config = AuditConfig(every_n_steps=10, metrics=("mse", "ssim"), seed=3)
    changed = config.replace(every_n_steps=20, seed=4)
    assert (changed.every_n_steps, changed.seed) == (20, 4)
    assert changed.metrics == config.metrics and changed.success_metric == "ssim"
    assert (config.every_n_steps, config.seed) == (10, 3)  # the original is untouched
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        config.replace(every_n_steps=0)
    with pytest.raises(TypeError, match="did you mean 'every_n_steps'"):
        config.replace(every_n_step=20)


def test_replace_derives_the_unset_success_metric_again():
    config = AuditConfig().replace(metrics=("mse", "ssim"))
    assert (config.success_metric, config.success_threshold) == ("ssim", 0.7)
    explicit = AuditConfig(success_metric="mse").replace(metrics=("mse", "ssim"))
    assert (explicit.success_metric, explicit.success_threshold) == ("mse", 0.01)


def test_to_dict_is_json_safe_and_describes_every_setting():
    public = torch.rand(4, 1, 28, 28)
    config = AuditConfig(metrics=("mse", "ssim"), public=public, prior="embedded:mnist")
    out = config.to_dict()
    names = [f.name for f in dataclasses.fields(AuditConfig)]
    at = names.index("sampler") + 1  # run.json keeps release 0.1's three sampler keys
    assert list(out) == names[:at] + ["sampler_steps", "sampler_min_stride"] + names[at:]
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert out["metrics"] == "mse,ssim"
    assert out["public"] == "4x1x28x28"  # the shape, never the images
    assert out["prior"] == "embedded:mnist"
    assert (out["sampler"], out["sampler_steps"], out["sampler_min_stride"]) == ("ddim", 20, 20)
    assert out["success_metric"] == "ssim" and out["success_threshold"] == 0.7
    assert out["shadow"] is False


def test_to_dict_without_a_prior_has_no_sampler():
    out = AuditConfig(shadow=True).to_dict()
    assert out["prior"] is None and out["public"] is None and out["shadow"] is True
    assert out["sampler"] is None and out["sampler_steps"] is None
    assert out["sampler_min_stride"] is None
