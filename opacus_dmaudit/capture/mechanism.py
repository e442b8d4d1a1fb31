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
    "FINGERPRINT",
    "SUM_TOLERANCE",
    "TOLERANCE_UNITS",
    "rounding_unit",
    "sum_tolerance",
    "noise_std_of",
    "noise_signs",
    "snapshot_noise",
    "snapshot_clipping",
    "clean_sums_before",
]

#: Coordinates of the noise kept per audit for the shape test.
NOISE_SAMPLE = 4096

#: Fixed coordinates whose noise signs are kept per audit (and at the step before it) for the
#: freshness check: the same positions at every step, so reused noise agrees in sign.
FINGERPRINT = 1024

#: The clean sum may differ from the recomputed clipped sum by this relative amount (float32 and
#: float64; lower precisions get :func:`sum_tolerance`).
SUM_TOLERANCE = 1e-4

#: Relative tolerances are this many unit round-offs of the coarsest dtype involved.
TOLERANCE_UNITS = 4


def rounding_unit(dtype: torch.dtype | None) -> float:
    """The unit round-off ``eps/2`` of a floating dtype (bf16 2⁻⁸, fp16 2⁻¹¹, fp32 2⁻²⁴)."""
    if dtype is None or not dtype.is_floating_point:
        return 0.0
    return torch.finfo(dtype).eps / 2


def sum_tolerance(dtypes) -> float:
    """How far a recomputed sum may be from Opacus's, relatively, given the dtypes it was computed
    in: :data:`SUM_TOLERANCE`, or :data:`TOLERANCE_UNITS` round-offs of the coarsest dtype (bf16:
    1.6 %, fp16: 0.2 %), whichever is larger."""
    units = [rounding_unit(getattr(torch, d, None) if isinstance(d, str) else d) for d in dtypes]
    return max([SUM_TOLERANCE] + [TOLERANCE_UNITS * u for u in units])


def _dtype_name(t: torch.Tensor | None) -> str | None:
    return None if t is None else str(t.dtype).replace("torch.", "")


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


def _positions(optimizer, size: int) -> torch.Tensor:
    """``size`` evenly spaced flat positions over *all* the optimizer's parameters (the same at
    every step, whichever parameters have a gradient)."""
    total = sum(p.numel() for p in optimizer.params)
    if total <= size:
        return torch.arange(total)
    return torch.div(torch.arange(size) * total, size, rounding_mode="floor")


def _noise_of(p: torch.Tensor, denominator: float) -> torch.Tensor | None:
    """This step's noise on ``p`` (``p.grad·denominator − p.summed_grad``, float64, flat)."""
    clean = summed_grad(p)
    if p.grad is None or clean is None:
        return None
    noised = p.grad.detach().reshape(-1).double() * denominator
    return noised - clean.detach().reshape(-1).double()


@torch.no_grad()
def noise_signs(optimizer, *, denominator: float, size: int = FINGERPRINT) -> torch.Tensor | None:
    """Signs (−1, 0 where unknown, +1) of this step's noise at :func:`_positions` (int8).

    Fresh Gaussian noise agrees in sign with another step's at each position with probability
    1/2; noise drawn again from a re-seeded generator agrees everywhere. Reads only the
    ``size`` coordinates.
    """
    picks = _positions(optimizer, size)
    out = torch.zeros(picks.numel(), dtype=torch.int8)
    offset, found = 0, False
    for p in optimizer.params:
        lo = int(torch.searchsorted(picks, offset))
        hi = int(torch.searchsorted(picks, offset + p.numel()))
        clean = summed_grad(p)
        if hi > lo and p.grad is not None and clean is not None:
            local = (picks[lo:hi] - offset).to(p.grad.device)
            noised = p.grad.detach().reshape(-1)[local].double() * denominator
            noise = noised - clean.detach().reshape(-1)[local].double()
            out[lo:hi] = torch.sign(noise).to(torch.int8).cpu()
            found = True
        offset += p.numel()
    return out if found else None


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
        ``{"sum_sq", "sum", "count", "rounding_sq", "expected_std", "params", "sample", "dot",
        "clean_sq", "signs", "dtypes"}``: ``rounding_sq`` bounds the squared norm of the float
        round-off in the measured noise (of the noised and of the clean sum); ``params`` holds
        ``[label, sum_sq, count]`` per parameter; ``sample`` up to ``sample_size`` distinct
        coordinates, evenly spaced over all parameters (under a correct mechanism every
        coordinate's noise is independent, so any fixed choice is a fair sample); ``dot`` and
        ``clean_sq``: ``⟨noise, clean⟩`` and ``‖clean‖²`` (a gradient scaled by another factor
        than the optimizer's denominator leaves part of the clean sum in the "noise"); ``signs``:
        :func:`noise_signs`; ``dtypes``: of the gradients and clean sums. ``None`` when no
        parameter has both sums.
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
    out.update(dot=0.0, clean_sq=0.0, dtypes=sorted({_dtype_name(p.grad) for p in params}))
    out["dtypes"] = sorted(set(out["dtypes"]) | {_dtype_name(summed_grad(p)) for p in params})
    pieces = []
    offset = 0
    for index, p in enumerate(optimizer.params):
        noise = _noise_of(p, denominator)
        if noise is None:
            continue
        clean = summed_grad(p).detach().reshape(-1).double()
        noised = noise + clean
        sq = float(noise.square().sum())
        out["sum_sq"] += sq
        out["sum"] += float(noise.sum())
        out["count"] += noise.numel()
        out["dot"] += float((noise * clean).sum())
        out["clean_sq"] += float(clean.square().sum())
        eps = 2 * rounding_unit(p.grad.dtype)
        eps_clean = 2 * rounding_unit(summed_grad(p).dtype)
        out["rounding_sq"] += float(
            (noised * eps).square().sum() + (clean * eps_clean).square().sum()
        )
        out["params"].append([_param_label(index, p, names), sq, noise.numel()])
        lo = int(torch.searchsorted(picks, offset))
        hi = int(torch.searchsorted(picks, offset + noise.numel()))
        if hi > lo:
            pieces.append(noise[(picks[lo:hi] - offset).to(noise.device)].cpu())
        offset += noise.numel()
    out["sample"] = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)
    out["signs"] = noise_signs(optimizer, denominator=denominator)
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
        ``"ghost"`` (``module_bound``, ``max_clipped``), or ``None`` when neither exists. Both
        carry ``dtypes`` and the ``tolerance`` (:func:`sum_tolerance`) those dtypes allow; a
        per-sample record whose sums disagree also carries ``fitted_bound`` (the κ for which
        clipping at κ·C explains the clean sum best) and its ``fitted_residual``.
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
        dtypes = sorted({_dtype_name(t) for t in norms} | {_dtype_name(p) for p in params})
        return {
            "source": "ghost",
            "bound": bound,
            "dtypes": dtypes,
            "tolerance": sum_tolerance(dtypes),
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
    dtypes = {_dtype_name(g) for _, g in live} | {_dtype_name(clean[i]) for i, _ in live}
    dtypes |= {_dtype_name(params[i]) for i, _ in live}
    out["dtypes"] = sorted(d for d in dtypes if d)
    out["tolerance"] = sum_tolerance(out["dtypes"])
    if batch == 0:
        out.update(residual=0.0, max_clipped=0.0, max_norm=0.0)
        return out
    flat = [g.reshape(batch, -1).double() for _, g in live]  # Opacus sums in ≥ fp32 too
    layer_norms = torch.stack([f.norm(2, dim=1) for f in flat], dim=1)  # (B, P)
    norms = layer_norms.norm(2, dim=1)
    if per_layer is not None:
        limits = torch.tensor([float(per_layer[i]) for i, _ in live], dtype=layer_norms.dtype)
        limits = limits.to(layer_norms.device)
    else:
        limits = None
    factors = _factors(layer_norms, norms, bound, limits)
    clipped = (factors * layer_norms).norm(2, dim=1)
    targets = [_target(clean, before, i) for i, _ in live]
    diff_sq, ref_sq = _residual(flat, targets, factors)
    raw_sq = sum(float((t - f.sum(dim=0)).square().sum()) for f, t in zip(flat, targets))
    scale = math.sqrt(ref_sq) if ref_sq > 0 else 1.0
    out.update(
        residual=math.sqrt(diff_sq) / scale,
        max_clipped=float(clipped.max()) / bound,
        max_norm=float(norms.max()) / bound,
    )
    if out["residual"] > out["tolerance"]:
        out["unclipped_residual"] = math.sqrt(raw_sq) / scale
        out["effective_max"] = _effective_max(live, flat, clean, before, norms, bound)
        out.update(_fit_bound(flat, targets, layer_norms, norms, bound, limits, scale))
    return out


def _factors(layer_norms, norms, bound: float, limits) -> torch.Tensor:
    """``(B, P)`` per-sample (and per-layer) clipping factors at the bound(s), as Opacus uses."""
    if limits is not None:
        return (limits / (layer_norms + 1e-6)).clamp(max=1.0)
    factor = (bound / (norms + 1e-6)).clamp(max=1.0)
    return factor[:, None].expand(-1, layer_norms.shape[1])


def _target(clean, before, i: int) -> torch.Tensor:
    """The clean clipped sum of the per-sample gradients at hand (float64, flat)."""
    target = clean[i].detach().double()
    if before is not None and before[i] is not None:
        target = target - before[i].double()
    return target.reshape(-1)


def _residual(flat, targets, factors) -> tuple[float, float]:
    """``(‖target − Σ_i f_i g_i‖², ‖Σ_i f_i g_i‖²)`` over all parameters."""
    diff_sq = ref_sq = 0.0
    for j, (g, target) in enumerate(zip(flat, targets)):
        expected = torch.einsum("i,i...", factors[:, j].to(g), g).reshape(-1)
        diff_sq += float((target - expected).square().sum())
        ref_sq += float(expected.square().sum())
    return diff_sq, ref_sq


def _fit_bound(flat, targets, layer_norms, norms, bound, limits, scale) -> dict[str, float]:
    """The bound κ·C that best explains the clean sum (golden-section search on κ).

    Returns ``{"fitted_bound": κ, "fitted_residual": relative distance at κ}``: a sum clipped
    at 1.1·C (a bug that leaves the noise at σC) fits κ = 1.1 with a residual at round-off.
    """
    top = max(float(norms.max()) / bound, 1.0) * 1.01
    lo, hi = 0.0, top
    golden = (math.sqrt(5) - 1) / 2

    def cost(k: float) -> float:
        scaled = None if limits is None else limits * k
        return _residual(flat, targets, _factors(layer_norms, norms, bound * k, scaled))[0]

    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = cost(a), cost(b)
    for _ in range(40):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = cost(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = cost(b)
    best = (a, fa) if fa <= fb else (b, fb)
    return {"fitted_bound": best[0], "fitted_residual": math.sqrt(best[1]) / scale}


def _effective_max(live, flat, clean, before, norms, bound) -> float | None:
    """Largest ``|c_i|·‖g_i‖ / C`` for the per-sample factors ``c`` that best fit the clean sum."""
    batch = flat[0].shape[0]
    if batch > 512:  # a B×B system: the fitted bound speaks for large batches
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
