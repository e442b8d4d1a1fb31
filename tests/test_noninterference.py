"""The audit must not change training: bit-identical parameters and identical ε."""

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from opacus_dmaudit import DMAuditor
from tests.helpers import imprint_model


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
    gen_kwargs = {}
    loader_gen = None
    if explicit_generators:
        gen_kwargs["noise_generator"] = torch.Generator().manual_seed(99)
        loader_gen = torch.Generator().manual_seed(98)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=50, generator=loader_gen
    )
    engine = PrivacyEngine(accountant="rdp")
    crit = nn.CrossEntropyLoss()
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        grad_sample_mode=grad_sample_mode,
        **({"criterion": crit} if grad_sample_mode == "ghost" else {}),
        **gen_kwargs,
    )
    model, opt, *rest = out
    loader = rest[-1]
    crit = rest[0] if grad_sample_mode == "ghost" else crit
    auditor = None
    if audit:
        # LPIPS and the embedded prior too: loading and running them must not touch the global RNG
        auditor = DMAuditor(
            privacy_engine=engine,
            log_dir=tmp_path,
            every_n_steps=2,
            prior="embedded:mnist",
            background=background,  # the worker thread runs while training goes on
        ).attach(opt)
    for i, (xb, yb) in enumerate(loader):
        opt.zero_grad()
        crit(model(xb), yb).backward()
        opt.step()
        if i + 1 == steps:
            break
    if auditor is not None:
        auditor.close()
        assert len(auditor.history) == steps // 2
        assert any("lpips_dm" in im for r in auditor.history for im in r["images"])
    params = [p.detach().clone() for p in model.parameters()]
    return params, engine.get_epsilon(1e-5), torch.rand(4)


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
    from tests.helpers import small_cnn

    torch.manual_seed(1234)
    x, y = mnist5k["private"]
    model = small_cnn()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=loader,
        noise_multiplier=0.02,
        max_grad_norm=1.0,
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
    for i, (xb, yb) in enumerate(loader):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        if i + 1 == steps:
            break
    if auditor is not None:
        auditor.close()
        assert [r["mode"] for r in auditor.history] == ["shadow"] * (steps // 2)
        assert sum(r["found_singletons"] for r in auditor.history) > 10  # the adversary read
    params = [p.detach().clone() for p in model.parameters()]
    return params, engine.get_epsilon(1e-5), torch.rand(4)


def test_training_is_bit_identical_with_shadow_audits(mnist5k, tmp_path):
    p_without, eps_without, rng_without = _train_plain(mnist5k, tmp_path / "a", audit=False)
    p_with, eps_with, rng_with = _train_plain(mnist5k, tmp_path / "b", audit=True)
    for a, b in zip(p_with, p_without, strict=True):
        assert torch.equal(a, b)
    assert eps_with == eps_without
    assert torch.equal(rng_with, rng_without)
