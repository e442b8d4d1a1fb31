"""The audit must not change training: bit-identical parameters and identical ε."""

import pytest
import torch

from opacus_dmaudit import DMAuditor
from tests.helpers import imprint_model, make_private, private_training, small_cnn, train_steps


def _train(
    mnist5k,
    tmp_path,
    *,
    audit,
    explicit_generators,
    grad_sample_mode,
    sigma=0.02,
    steps=6,
    background=False,
):
    torch.manual_seed(1234)
    x, y = mnist5k["private"]
    model = imprint_model(mnist5k["prior"][0][:1000], num_bins=64, seed=7)
    generators = {}
    if explicit_generators:
        generators["noise_generator"] = torch.Generator().manual_seed(99)
        generators["loader_generator"] = torch.Generator().manual_seed(98)
    p = private_training(
        model,
        x,
        y,
        sigma=sigma,
        batch_size=50,
        lr=0.1,
        momentum=0.9,
        grad_sample_mode=grad_sample_mode,
        **generators,
    )
    auditor = None
    if audit:
        # LPIPS and the embedded prior too: loading and running them must not touch the global RNG
        auditor = DMAuditor(
            privacy_engine=p.engine,
            log_dir=tmp_path,
            every_n_steps=2,
            prior="embedded:mnist",
            background=background,  # the worker thread runs while training goes on
        ).attach(p.optimizer)
    train_steps(p.model, p.optimizer, p.loader, steps, criterion=p.criterion)
    if auditor is not None:
        auditor.close()
        assert len(auditor.history) == steps // 2
        assert any("lpips_dm" in im.metrics for r in auditor.history for im in r.images)
    params = [q.detach().clone() for q in p.model.parameters()]
    return params, p.engine.get_epsilon(1e-5), torch.rand(4)


@pytest.mark.parametrize(
    "explicit_generators,grad_sample_mode,background",
    [
        (False, "hooks", False),
        (True, "hooks", False),
        (False, "ghost", False),
        (False, "hooks", True),
    ],
)
def test_training_is_bit_identical_with_and_without_auditor(
    mnist5k, tmp_path, explicit_generators, grad_sample_mode, background
):
    kwargs = dict(explicit_generators=explicit_generators, grad_sample_mode=grad_sample_mode)
    p_without, eps_without, rng_without = _train(mnist5k, tmp_path / "a", audit=False, **kwargs)
    p_with, eps_with, rng_with = _train(
        mnist5k, tmp_path / "b", audit=True, background=background, **kwargs
    )
    assert len(p_with) == len(p_without)
    for a, b in zip(p_with, p_without):
        assert torch.equal(a, b)
    assert eps_with == eps_without
    assert torch.equal(rng_with, rng_without)  # the global RNG stream is untouched too


def _train_plain(mnist5k, tmp_path, *, audit: bool, steps: int = 6):
    """A model without an ImprintBlock, with shadow audits (and the mechanism checks) or none.

    The prior and LPIPS are covered by the live-imprint test above; here the simulated
    adversary's noise and bins must not touch training either."""
    torch.manual_seed(1234)
    x, y = mnist5k["private"]
    model, opt, loader, engine = make_private(
        small_cnn(), x, y, sigma=0.02, batch_size=50, lr=0.1, momentum=0.9
    )
    auditor = None
    if audit:
        auditor = DMAuditor(
            privacy_engine=engine,
            log_dir=tmp_path,
            every_n_steps=2,
            shadow=True,
            public=mnist5k["prior"][0][:500],
            metrics=("mse", "ssim"),
        ).attach(opt, model=model)
    train_steps(model, opt, loader, steps)
    if auditor is not None:
        auditor.close()
        assert [r.mode for r in auditor.history] == ["shadow"] * (steps // 2)
        assert sum(r.counts.lone_found for r in auditor.history) > 10  # the adversary read
    params = [p.detach().clone() for p in model.parameters()]
    return params, engine.get_epsilon(1e-5), torch.rand(4)


def test_training_is_bit_identical_with_shadow_audits(mnist5k, tmp_path):
    p_without, eps_without, rng_without = _train_plain(mnist5k, tmp_path / "a", audit=False)
    p_with, eps_with, rng_with = _train_plain(mnist5k, tmp_path / "b", audit=True)
    for a, b in zip(p_with, p_without, strict=True):
        assert torch.equal(a, b)
    assert eps_with == eps_without
    assert torch.equal(rng_with, rng_without)
