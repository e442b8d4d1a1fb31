"""The DP mechanism, measured inside ``optimizer.step`` on audited steps (no judgement here).

At the step hook every parameter holds the noised, scaled sum ``p.grad`` and the clean clipped sum
``p.summed_grad`` (and, in most grad-sample modes, the per-sample gradients): their difference is
the noise itself, and the per-sample gradients say what clipping should have produced. The
functions here reduce those tensors to small statistics, cheaply, on audit steps only; the checks
that judge them live in :mod:`opacus_dmaudit.checks.mechanism`.

Nothing here writes to a tensor that training reads or draws from the global generator. The
Opacus internals read here are listed, with accessors, in :mod:`opacus_dmaudit._opacus`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._opacus import (
    effective_noise_multiplier,
    grad_sample,
    module_clipping_bound,
    norm_sample,
    per_layer_bounds,
    summed_grad,
)

__all__ = [
    "NOISE_SAMPLE",
    "SUM_TOLERANCE",
    "noise_std_of",
    "snapshot_noise",
    "snapshot_clipping",
    "clean_sums_before",
]

#: Coordinates of the noise kept per audit for the shape test.
NOISE_SAMPLE = 4096

#: The clean sum may differ from the recomputed clipped sum by this relative amount.
SUM_TOLERANCE = 1e-4


def noise_std_of(optimizer) -> float:
    """The std of the noise the optimizer adds per coordinate of the summed gradient.

    ``σ·C`` for flat and per-layer clipping (``C`` the norm of the per-layer bounds); Opacus's
    adaptive clipping adds noise at the larger ``σ_eff = (σ⁻² − (2σ_u)⁻²)^(−1/2)`` (its accountant
    is told σ).
    """
    return effective_noise_multiplier(optimizer) * float(optimizer.max_grad_norm)


def _param_label(index: int, p: torch.Tensor, names: Mapping[int, str] | None) -> str:
    name = (names or {}).get(id(p))
    shape = "×".join(str(s) for s in p.shape) or "scalar"
    return f"{name} ({shape})" if name else f"parameter {index} ({shape})"


@torch.no_grad()
def snapshot_noise(
    optimizer,
    *,
    denominator: float,
    names: Mapping[int, str] | None = None,
    sample_size: int = NOISE_SAMPLE,
) -> dict[str, Any] | None:
    """Statistics of the noise ``p.grad·denominator − p.summed_grad`` over every parameter.

    Called where ``p.grad`` is the noised, scaled sum and ``p.summed_grad`` the clean clipped sum
    (the step hook; under DDP on rank 0, before the all-reduce, where rank 0 holds all the noise).

    Returns:
        ``{"sum_sq", "sum", "count", "rounding_sq", "expected_std", "params", "sample"}``:
        ``rounding_sq`` bounds the squared norm of the float round-off in the measured noise;
        ``params`` holds ``[label, sum_sq, count]`` per parameter; ``sample`` up to
        ``sample_size`` distinct coordinates, evenly spaced over all parameters (under a correct
        mechanism every coordinate's noise is independent, so any fixed choice is a fair
        sample). ``None`` when no parameter has both sums.
    """
    params = [p for p in optimizer.params if p.grad is not None and summed_grad(p) is not None]
    if not params:
        return None
    total = sum(p.numel() for p in params)
    if total > sample_size:  # evenly spaced, all distinct, over every parameter
        picks = torch.div(torch.arange(sample_size) * total, sample_size, rounding_mode="floor")
    else:
        picks = torch.arange(total)
    out = {"sum_sq": 0.0, "sum": 0.0, "count": 0, "rounding_sq": 0.0, "params": []}
    pieces = []
    offset = 0
    for index, p in enumerate(optimizer.params):
        clean = summed_grad(p)
        if p.grad is None or clean is None:
            continue
        noised = p.grad.detach().reshape(-1).double() * denominator
        noise = noised - clean.detach().reshape(-1).double()
        sq = float(noise.square().sum())
        eps = torch.finfo(p.grad.dtype).eps if p.grad.is_floating_point() else 0.0
        out["sum_sq"] += sq
        out["sum"] += float(noise.sum())
        out["count"] += noise.numel()
        out["rounding_sq"] += float((noised * eps).square().sum())
        out["params"].append([_param_label(index, p, names), sq, noise.numel()])
        lo = int(torch.searchsorted(picks, offset))
        hi = int(torch.searchsorted(picks, offset + noise.numel()))
        if hi > lo:
            pieces.append(noise[(picks[lo:hi] - offset).to(noise.device)].cpu())
        offset += noise.numel()
    out["sample"] = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)
    out["expected_std"] = noise_std_of(optimizer)
    return out


@torch.no_grad()
def clean_sums_before(optimizer) -> list[torch.Tensor | None] | None:
    """Copies of the clean sums accumulated so far, or ``None`` when nothing is accumulated.

    Under ``BatchMemoryManager`` the per-sample gradients at the step hold only the last physical
    batch while ``summed_grad`` holds them all; the capture calls this at each physical batch's
    forward of an audit step, so that the last batch's own clipped sum is the difference.
    """
    sums = [summed_grad(p) for p in optimizer.params]
    if all(s is None for s in sums):
        return None
    return [None if s is None else s.detach().clone() for s in sums]


def _per_sample(optimizer, p) -> torch.Tensor | None:
    gs = grad_sample(p)
    if gs is None:
        return None
    if isinstance(gs, list):
        return torch.cat(gs, dim=0) if gs else None
    return gs


@torch.no_grad()
def snapshot_clipping(
    optimizer,
    *,
    clean: Sequence[torch.Tensor | None],
    before: Sequence[torch.Tensor | None] | None = None,
    partial: bool = False,
    module=None,
) -> dict[str, Any] | None:
    """Whether the clean clipped sum is what clipping every sample to C gives.

    Args:
        optimizer: the ``DPOptimizer`` at its step hook.
        clean: per parameter, this process's clean clipped sum (``p.summed_grad``; under DDP on
            ranks other than 0, ``p.grad·denominator``).
        before: the clean sums before the last physical batch (:func:`clean_sums_before`), or
            ``None`` when the per-sample gradients cover the whole step.
        partial: the per-sample gradients cover only part of the step and ``before`` is unknown
            (nothing can be compared).
        module: the model ``make_private`` returned (ghost mode: its clipping bound).

    Returns:
        ``{"source", "bound", "samples", ...}`` with ``source`` ``"per_sample"`` (``residual``:
        relative distance between the clean sum and the recomputed clipped sum,
        ``max_clipped``: largest clipped contribution norm over C, ``max_norm``: largest
        unclipped norm over C, and when the sums disagree ``unclipped_residual`` and
        ``effective_max``: the largest contribution norm over C that fits the clean sum) or
        ``"ghost"`` (``module_bound``, ``max_clipped``), or ``None`` when neither exists.
    """
    params = list(optimizer.params)
    bound = float(optimizer.max_grad_norm)
    per_layer = per_layer_bounds(optimizer)
    samples = [_per_sample(optimizer, p) for p in params]
    if any(s is not None for s in samples):
        if partial:
            return {"source": "per_sample", "bound": bound, "partial": True, "samples": 0}
        return _per_sample_stats(params, samples, clean, before, bound, per_layer)
    norms = [norm_sample(p) for p in params]
    norms = [n for n in norms if isinstance(n, torch.Tensor)]
    if norms:  # ghost clipping: per-sample norms only, the clean sum cannot be recomputed
        n = torch.stack([t.double().reshape(-1) for t in norms], dim=0).norm(dim=0)
        module_bound = module_clipping_bound(module)
        applied = float(module_bound) if module_bound is not None else bound
        clipped = torch.clamp(applied / (n + 1e-6), max=1.0) * n if n.numel() else n
        return {
            "source": "ghost",
            "bound": bound,
            "module_bound": None if module_bound is None else float(module_bound),
            "samples": int(n.numel()),
            "max_norm": float(n.max()) / bound if n.numel() else 0.0,
            "max_clipped": float(clipped.max()) / bound if n.numel() else 0.0,
        }
    return None


def _per_sample_stats(params, samples, clean, before, bound, per_layer) -> dict[str, Any]:
    live = [(i, g) for i, g in enumerate(samples) if g is not None and clean[i] is not None]
    batch = int(live[0][1].shape[0]) if live else 0
    out: dict[str, Any] = {"source": "per_sample", "bound": bound, "samples": batch}
    if batch == 0:
        out.update(residual=0.0, max_clipped=0.0, max_norm=0.0)
        return out
    flat = [g.reshape(batch, -1) for _, g in live]
    layer_norms = torch.stack([f.norm(2, dim=1) for f in flat], dim=1)  # (B, P)
    norms = layer_norms.norm(2, dim=1)
    if per_layer is not None:
        limits = torch.tensor([float(per_layer[i]) for i, _ in live], dtype=layer_norms.dtype)
        limits = limits.to(layer_norms.device)
        factors = (limits / (layer_norms + 1e-6)).clamp(max=1.0)  # (B, P)
        clipped = (factors * layer_norms).norm(2, dim=1)
    else:
        factor = (bound / (norms + 1e-6)).clamp(max=1.0)
        factors = factor[:, None].expand(-1, len(live))
        clipped = factor * norms
    diff_sq = ref_sq = raw_sq = 0.0
    for j, (i, g) in enumerate(live):
        target = clean[i].detach().double()
        if before is not None and before[i] is not None:
            target = target - before[i].double()
        target = target.reshape(-1)
        f = factors[:, j].to(g.dtype)
        expected = torch.einsum("i,i...", f, g).reshape(-1).double()
        diff_sq += float((target - expected).square().sum())
        ref_sq += float(expected.square().sum())
        raw_sq += float((target - g.sum(dim=0).reshape(-1).double()).square().sum())
    scale = math.sqrt(ref_sq) if ref_sq > 0 else 1.0
    out.update(
        residual=math.sqrt(diff_sq) / scale,
        max_clipped=float(clipped.max()) / bound,
        max_norm=float(norms.max()) / bound,
    )
    if out["residual"] > SUM_TOLERANCE:
        out["unclipped_residual"] = math.sqrt(raw_sq) / scale
        out["effective_max"] = _effective_max(live, flat, clean, before, norms, bound)
    return out


def _effective_max(live, flat, clean, before, norms, bound) -> float | None:
    """Largest ``|c_i|·‖g_i‖ / C`` for the per-sample factors ``c`` that best fit the clean sum."""
    batch = flat[0].shape[0]
    if batch > 512:
        return None
    gram = torch.zeros(batch, batch, dtype=torch.float64)
    rhs = torch.zeros(batch, dtype=torch.float64)
    for (i, _), f in zip(live, flat):
        g = f.double().cpu()
        target = clean[i].detach().double().cpu()
        if before is not None and before[i] is not None:
            target = target - before[i].double().cpu()
        gram += g @ g.T
        rhs += g @ target.reshape(-1)
    coef = torch.linalg.lstsq(gram, rhs[:, None]).solution[:, 0]
    return float((coef.abs() * norms.double().cpu()).max()) / bound
