"""The private Opacus/torch attributes the package relies on (``opacus_dmaudit/_opacus.py``).

One test per attribute, each against a real ``PrivacyEngine().make_private(...)`` (hooks, ghost
or functorch mode, ``BatchMemoryManager``, adaptive and per-layer clipping, DDP in one process):
if an Opacus release renames or changes one, its test fails with a message naming it.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from opacus_dmaudit import _opacus

warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")

#: Samples, features and batch size of the runs below.
N, D, BATCH = 256, 16, 32


def _provides(ok: bool, attribute: str, what: str) -> None:
    """Fail naming ``attribute`` when Opacus no longer behaves as the package assumes."""
    if not ok:
        pytest.fail(
            f"Opacus no longer provides {attribute} as opacus_dmaudit relies on it: {what}. "
            "Update opacus_dmaudit/_opacus.py and the call sites it lists.",
            pytrace=False,
        )


def _data(seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(
        torch.randn(N, D, generator=g), torch.randint(0, 2, (N,), generator=g)
    )


def _model(width: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(D, width), nn.ReLU(), nn.Linear(width, 2))


def _private(
    mode: str = "hooks",
    *,
    sigma: float = 1.0,
    model: nn.Module | None = None,
    engine: PrivacyEngine | None = None,
    poisson: bool = False,
    **kwargs,
):
    """``(model, optimizer, loader, criterion, engine)`` of ``make_private`` in ``mode``."""
    torch.manual_seed(0)
    model = model if model is not None else _model()
    engine = engine if engine is not None else PrivacyEngine(accountant="rdp")
    criterion = nn.CrossEntropyLoss(reduction=kwargs.get("loss_reduction", "mean"))
    if mode == "ghost":
        kwargs["criterion"] = criterion
    kwargs.setdefault("max_grad_norm", 1.0)
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=torch.utils.data.DataLoader(_data(), batch_size=BATCH),
        noise_multiplier=sigma,
        grad_sample_mode=mode,
        poisson_sampling=poisson,
        **kwargs,
    )
    if mode == "ghost":
        model, optimizer, criterion, loader = out
    else:
        model, optimizer, loader = out
    return model, optimizer, loader, criterion, engine


def _in_step_hook(optimizer, fn) -> list:
    """Run ``fn(optimizer)`` in the step hook after the accountant's (as the capture does)."""
    seen, previous = [], optimizer.step_hook

    def hook(opt):
        if previous is not None:
            previous(opt)
        seen.append(fn(opt))

    optimizer.attach_step_hook(hook)
    return seen


def _steps(model, optimizer, loader, criterion, steps: int = 1) -> None:
    for i, (x, y) in enumerate(loader):
        if i == steps:
            return
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()


def _noise_std(optimizer) -> float:
    """RMS of ``p.grad · denominator − p.summed_grad`` over every coordinate."""
    denom = _opacus.noise_denominator(optimizer)
    sq = n = 0
    for p in optimizer.params:
        noise = p.grad.double() * denom - _opacus.summed_grad(p).double()
        sq, n = sq + float(noise.square().sum()), n + noise.numel()
    return math.sqrt(sq / n)


# -- per parameter ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_summed_grad_is_the_sum_of_the_clipped_per_sample_gradients(mode):
    model, opt, loader, criterion, _ = _private(mode, sigma=0.0)

    def check(o):
        samples = [_opacus.grad_sample(p) for p in o.params]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
        factor = (o.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        return all(
            _opacus.summed_grad(p) is not None
            and torch.allclose(_opacus.summed_grad(p), torch.einsum("i,i...", factor, g), atol=1e-6)
            for p, g in zip(o.params, samples)
        )

    seen = _in_step_hook(opt, check)
    _steps(model, opt, loader, criterion)
    _provides(seen == [True], "p.summed_grad", "the clean clipped sum at the step hook")


def test_summed_grad_in_ghost_mode():
    model, opt, loader, criterion, _ = _private("ghost", sigma=0.0)
    seen = _in_step_hook(
        opt, lambda o: [tuple(_opacus.summed_grad(p).shape) == p.shape for p in o.params]
    )
    _steps(model, opt, loader, criterion)
    _provides(
        seen and all(seen[0]), "p.summed_grad", "the clean clipped sum in ghost mode, p's shape"
    )


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_grad_sample_holds_one_gradient_per_sample(mode):
    model, opt, loader, criterion, _ = _private(mode)
    seen = _in_step_hook(
        opt,
        lambda o: [
            isinstance(_opacus.grad_sample(p), torch.Tensor)
            and tuple(_opacus.grad_sample(p).shape) == (BATCH, *p.shape)
            for p in o.params
        ],
    )
    _steps(model, opt, loader, criterion)
    _provides(seen and all(seen[0]), "p.grad_sample", f"a (batch, *p.shape) tensor ({mode})")


def test_norm_sample_holds_ghost_per_sample_norms():
    model, opt, loader, criterion, _ = _private("ghost")
    seen = _in_step_hook(
        opt,
        lambda o: [
            isinstance(_opacus.norm_sample(p), torch.Tensor)
            and _opacus.norm_sample(p).shape[0] == BATCH
            for p in o.params
        ],
    )
    _steps(model, opt, loader, criterion)
    _provides(seen and all(seen[0]), "p._norm_sample", "ghost clipping's per-sample norms")


# -- the DPOptimizer -------------------------------------------------------------------------------
def test_is_last_step_skipped_between_physical_batches():
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    model, opt, loader, criterion, _ = _private()
    forwards: list[bool] = []
    model.register_forward_hook(lambda *_: forwards.append(_opacus.last_step_skipped(opt)))
    at_hook = _in_step_hook(opt, _opacus.last_step_skipped)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=8, optimizer=opt) as ml:
        for i, (x, y) in enumerate(ml):
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
            if i == 3:  # one logical step of 32 in four physical batches of 8
                break
    _provides(
        forwards == [False, True, True, True] and at_hook == [True],
        "DPOptimizer._is_last_step_skipped",
        f"True from the second physical batch of a step to its step hook (forwards {forwards}, "
        f"step hook {at_hook})",
    )
    at_hook.clear()
    _steps(model, opt, loader, criterion)
    _provides(at_hook == [False], "DPOptimizer._is_last_step_skipped", "False for one batch")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_noise_denominator_turns_grad_back_into_the_noised_sum(reduction):
    """σ = 0: ``p.grad · denominator`` is the clean sum (``expected_batch_size``,
    ``accumulated_iterations`` and ``loss_reduction`` as ``scale_grad`` uses them)."""
    model, opt, loader, criterion, _ = _private(sigma=0.0, loss_reduction=reduction)
    seen = _in_step_hook(
        opt,
        lambda o: all(
            torch.allclose(p.grad * _opacus.noise_denominator(o), _opacus.summed_grad(p))
            for p in o.params
        ),
    )
    _steps(model, opt, loader, criterion)
    _provides(
        seen == [True],
        "DPOptimizer.expected_batch_size/accumulated_iterations/loss_reduction",
        f"p.grad = noised sum / denominator for loss_reduction={reduction!r}",
    )


def test_accumulated_iterations_counts_backward_passes_of_a_step():
    model, opt, loader, criterion, _ = _private(sigma=0.0)
    seen = _in_step_hook(
        opt,
        lambda o: (
            _opacus.accumulated_iterations(o),
            all(
                torch.allclose(p.grad * _opacus.noise_denominator(o), _opacus.summed_grad(p))
                for p in o.params
            ),
        ),
    )
    batches = iter(loader)
    opt.zero_grad()
    for _ in range(2):  # two backward passes, no zero_grad between them
        x, y = next(batches)
        criterion(model(x), y).backward()
    opt.step()
    _provides(
        seen == [(2, True)],
        "DPOptimizer.accumulated_iterations",
        f"2 after two backward passes, and the denominator scales by it (got {seen})",
    )


def test_expected_batch_size_is_the_batch_size_make_private_derives():
    _, opt, *_ = _private(poisson=True)
    _provides(
        _opacus.expected_batch_size(opt) == BATCH,
        "DPOptimizer.expected_batch_size",
        f"N·q = {BATCH} for Poisson sampling (got {_opacus.expected_batch_size(opt)!r})",
    )


def test_step_hook_slot_holds_the_accountant_and_runs_once_per_step():
    model, opt, loader, criterion, engine = _private()
    accountant_hook = _opacus.step_hook(opt)
    _provides(callable(accountant_hook), "DPOptimizer.step_hook", "make_private fills it")
    calls = []

    def ours(o):
        accountant_hook(o)
        calls.append(o)

    _opacus.attach_step_hook(opt, ours)
    _provides(_opacus.step_hook(opt) is ours, "DPOptimizer.attach_step_hook", "installs a hook")
    _steps(model, opt, loader, criterion, steps=2)
    _provides(
        calls == [opt, opt] and sum(t for *_, t in engine.accountant.history) == 2,
        "DPOptimizer.step_hook",
        "called once per step with the optimizer, the accountant counting through the chain",
    )
    _opacus.restore_step_hook(opt, accountant_hook)
    _steps(model, opt, loader, criterion)
    _provides(len(calls) == 2, "DPOptimizer.step_hook", "restoring it removes ours")


def test_original_optimizer_fires_torch_step_hooks_after_the_step_hook():
    model, opt, loader, criterion, _ = _private()
    order: list[str] = []
    _in_step_hook(opt, lambda o: order.append("step_hook"))
    wrapped = _opacus.original_optimizer(opt)
    wrapped.register_step_pre_hook(lambda *_: order.append("pre"))
    wrapped.register_step_post_hook(lambda *_: order.append("post"))
    _steps(model, opt, loader, criterion)
    _provides(
        isinstance(wrapped, torch.optim.SGD) and order == ["step_hook", "pre", "post"],
        "DPOptimizer.original_optimizer",
        f"the wrapped optimizer, updating after the step hook (order {order})",
    )


@contextlib.contextmanager
def _one_process_group(tmp_path):
    """A gloo process group of this process alone (what ``DistributedDPOptimizer`` needs)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_size_and_rank_of_a_distributed_optimizer(tmp_path):
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    _, plain, *_ = _private()
    _provides(
        _opacus.world_size(plain) == 1 and _opacus.process_rank(plain) == 0,
        "DPOptimizer.world_size/rank",
        "absent on a single-process optimizer",
    )
    with _one_process_group(tmp_path):
        _, opt, *_ = _private(model=DPDDP(_model()))
        _provides(
            type(opt).__name__ == "DistributedDPOptimizer"
            and getattr(opt, "world_size", None) == 1
            and getattr(opt, "rank", None) == 0,
            "DistributedDPOptimizer.world_size/rank",
            f"the process group's size and rank (got {type(opt).__name__})",
        )


def test_distributed_per_layer_clipping_is_recognised(tmp_path):
    """``clipping_mode`` knows DDP per-layer clipping by its class (a ``DPPerLayerOptimizer``
    subclass in Opacus 1.6, a class named ``DistributedPerLayerOptimizer`` in older releases)."""
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    from opacus_dmaudit.capture.hooks import clipping_mode

    with _one_process_group(tmp_path):
        _, opt, *_ = _private(model=DPDDP(_model()), clipping="per_layer", max_grad_norm=[0.5] * 4)
        _provides(
            clipping_mode(opt) == "per_layer",
            f"{type(opt).__name__} (DDP per-layer clipping's class)",
            "a DPPerLayerOptimizer, or a class named DistributedPerLayerOptimizer",
        )


def test_max_grad_norms_of_per_layer_clipping():
    bounds = [0.5, 0.5, 0.5, 0.5]
    _, opt, *_ = _private(clipping="per_layer", max_grad_norm=bounds)
    _provides(
        list(_opacus.per_layer_bounds(opt) or []) == bounds,
        "DPPerLayerOptimizer.max_grad_norms",
        "one bound per parameter",
    )
    from opacus_dmaudit.capture.hooks import clipping_mode

    _provides(clipping_mode(opt) == "per_layer", "DPPerLayerOptimizer", "its class")


def test_adjusted_noise_multiplier_of_adaptive_ghost_clipping():
    from opacus.utils.adaptive_clipping.adaptive_clipping_utils import (
        PrivacyEngineAdaptiveClipping,
    )

    model, opt, loader, criterion, _ = _private(
        "ghost",
        model=_model(width=256),
        engine=PrivacyEngineAdaptiveClipping(),
        target_unclipped_quantile=0.5,
        min_clipbound=0.1,
        max_clipbound=10.0,
        clipbound_learning_rate=0.2,
    )
    seen = _in_step_hook(
        opt, lambda o: (_noise_std(o), _opacus.effective_noise_multiplier(o) * o.max_grad_norm)
    )
    _steps(model, opt, loader, criterion)
    measured, predicted = seen[0]
    _provides(
        getattr(opt, "_adjusted_noise_multiplier", None) is not None
        and _opacus.effective_noise_multiplier(opt) > opt.noise_multiplier
        and abs(measured / predicted - 1) < 0.05,
        "DPOptimizerFastGradientClipping._adjusted_noise_multiplier",
        f"the σ adaptive ghost clipping adds noise at (measured std {measured:.4g}, "
        f"predicted {predicted:.4g})",
    )


def test_unclipped_num_std_of_adaclip():
    model, opt, loader, criterion, _ = _private(
        model=_model(width=256),
        clipping="adaptive",
        target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2,
        max_clipbound=10.0,
        min_clipbound=0.1,
        unclipped_num_std=1.0,
    )
    seen = _in_step_hook(
        opt, lambda o: (_noise_std(o), _opacus.effective_noise_multiplier(o) * o.max_grad_norm)
    )
    _steps(model, opt, loader, criterion)
    measured, predicted = seen[0]
    from opacus_dmaudit.capture.hooks import clipping_mode

    _provides(
        hasattr(opt, "unclipped_num_std")
        and clipping_mode(opt) == "adaptive"
        and abs(measured / predicted - 1) < 0.05,
        "AdaClipDPOptimizer.unclipped_num_std",
        f"noise at (σ⁻² − (2σ_u)⁻²)^(−1/2) (measured std {measured:.4g}, predicted {predicted:.4g})",
    )


def test_attached_capture_marker_is_free_on_the_optimizer():
    _, opt, *_ = _private()
    _provides(
        _opacus.attached_capture(opt) is None,
        "DPOptimizer._dmaudit_capture",
        "no attribute of that name of Opacus's own",
    )
    marker = object()
    _opacus.mark_attached(opt, marker)
    _provides(_opacus.attached_capture(opt) is marker, "DPOptimizer._dmaudit_capture", "settable")


def test_ghost_optimizers_are_named_fast_gradient_clipping():
    _, ghost, *_ = _private("ghost")
    _, hooks, *_ = _private("hooks")
    _provides(
        _opacus.is_ghost(ghost) and not _opacus.is_ghost(hooks),
        "DPOptimizerFastGradientClipping (class name)",
        f"ghost optimizers' classes contain 'FastGradientClipping' (got {type(ghost).__name__})",
    )


# -- modules and accountants -----------------------------------------------------------------------
def test_ghost_module_keeps_its_clipping_bound():
    model, *_ = _private("ghost", max_grad_norm=0.7)
    _provides(
        _opacus.module_clipping_bound(model) == 0.7,
        "GradSampleModuleFastGradientClipping.max_grad_norm",
        "the bound the ghost module clips at",
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_accountant_history_records_sigma_rate_and_steps(accountant):
    model, opt, loader, criterion, engine = _private(engine=PrivacyEngine(accountant=accountant))
    _steps(model, opt, loader, criterion, steps=3)
    history = _opacus.accountant_history(engine.accountant)
    _provides(
        history
        and all(len(e) == 3 for e in history)
        and history[-1][0] == opt.noise_multiplier
        and history[-1][1] == pytest.approx(BATCH / N)
        and sum(e[2] for e in history) == 3,
        f"{type(engine.accountant).__name__}.history",
        f"[(noise_multiplier, sample_rate, steps), ...] (got {history})",
    )
    epsilon = engine.accountant.get_epsilon(delta=1e-5)
    _opacus.set_accountant_history(engine.accountant, [])
    _provides(
        engine.accountant.history == [],
        f"{type(engine.accountant).__name__}.history",
        "assignable",
    )
    _opacus.set_accountant_history(engine.accountant, history)
    _provides(
        engine.accountant.get_epsilon(delta=1e-5) == pytest.approx(epsilon),
        f"{type(engine.accountant).__name__}.history",
        "its only state: restoring it restores ε",
    )


def test_rdp_default_alphas():
    from opacus.accountants import RDPAccountant

    orders = _opacus.rdp_orders(RDPAccountant())
    _provides(
        len(orders) > 10 and all(a > 1 for a in orders) and _opacus.rdp_orders() == orders,
        "RDPAccountant.DEFAULT_ALPHAS",
        "the RDP orders, all above 1",
    )


def test_prv_loss_distribution_gives_the_accountants_delta():
    from opacus.accountants import PRVAccountant

    history = [(1.0, 0.05, 200)]
    t, pmf = _opacus.prv_loss_distribution(history, eps_error=0.01, delta_error=1e-9)
    acc = PRVAccountant()
    acc.history = list(history)
    epsilon = acc.get_epsilon(delta=1e-5)
    # δ(ε) = E[(1 − e^{ε − t})⁺] over the privacy loss t
    delta = float((pmf * (1 - torch.exp(torch.as_tensor(epsilon - t))).clamp(min=0).numpy()).sum())
    _provides(
        len(t) == len(pmf) and abs(float(pmf.sum()) - 1) < 1e-6 and 0.5e-5 < delta < 2e-5,
        "PRVAccountant._get_dprv (domain.ts, pmf)",
        f"the privacy-loss distribution behind PRVAccountant.get_epsilon (δ(ε) = {delta:.3g})",
    )


def test_generate_noise_is_looked_up_at_each_step():
    model, opt, loader, criterion, _ = _private(model=_model(width=256))
    seen = _in_step_hook(opt, _noise_std)
    _steps(model, opt, loader, criterion)
    with _opacus.scaled_noise(0.5):
        _steps(model, opt, loader, criterion)
    _steps(model, opt, loader, criterion)
    full, half, again = seen
    _provides(
        abs(full - 1.0) < 0.05 and abs(half - 0.5) < 0.025 and abs(again - 1.0) < 0.05,
        "opacus.optimizers.optimizer._generate_noise",
        f"DPOptimizer.add_noise calls it at each step (noise std {full:.3f}, {half:.3f}, "
        f"{again:.3f} for σC = 1, 0.5, 1)",
    )


@pytest.mark.parametrize(
    "module, name",
    [
        ("opacus.grad_sample", "GradSampleModule"),
        ("opacus.grad_sample.gsm_base", "AbstractGradSampleModule"),
        ("opacus.optimizers", "AdaClipDPOptimizer"),
        ("opacus.optimizers", "DPPerLayerOptimizer"),
        ("opacus.accountants.analysis.rdp", "compute_rdp"),
        ("opacus.utils.adaptive_clipping.adaptive_clipping_utils", "PrivacyEngineAdaptiveClipping"),
        ("torch.utils.tensorboard.summary", "hparams"),
        ("tensorboard.compat.proto.event_pb2", "SessionLog"),
    ],
)
def test_internal_import_paths(module, name):
    import importlib

    found = getattr(importlib.import_module(module), name, None)
    _provides(found is not None, f"{module}.{name}", "imported from this module")


# -- torch and TensorBoard -------------------------------------------------------------------------
def test_summary_writer_file_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    try:
        fw = _opacus.file_writer(writer)
        _provides(
            all(hasattr(fw, m) for m in ("add_event", "add_summary", "get_logdir"))
            and fw.get_logdir() == str(tmp_path),
            "SummaryWriter._get_file_writer",
            "a FileWriter with add_event, add_summary and get_logdir",
        )
    finally:
        writer.close()
