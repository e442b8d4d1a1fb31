"""The membership scores of a run, out of its audit log into an ``.npz`` for other tools.

``dmaudit report LOGDIR --export-scores scores.npz`` writes every audit's membership-test scores
(:mod:`.empirical`: the oracle projection of lone imprint bins, members, and empty bins,
non-members, in units of the claimed noise std σC) so that other auditing libraries can read
them, e.g. to fit their own trade-off curve. The file holds:

==================  ====================================================================
``member``          float64, every member score, audits in order
``nonmember``       float64, every non-member score
``member_step``     int64, the optimizer step of the audit each member score comes from
``nonmember_step``  int64, the same for non-member scores
``member_sigma``    float64, σ (noise multiplier) of that audit; ``nonmember_sigma`` too
``member_clip``     float64, C (max_grad_norm) of that audit; ``nonmember_clip`` too
``delta``           float64 scalar, the run's δ (NaN when the log does not say)
``description``     str, what the scores are, in words
==================  ====================================================================

Under a correct Gaussian mechanism a non-member scores N(0, 1) and a member N(µ, 1) with
µ ≤ 1/σ. Only live imprint audits have scores (shadow audits simulate their own noise).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .packing import decode_floats

__all__ = ["export_scores", "DESCRIPTION"]

DESCRIPTION = (
    "opacus-dmaudit membership scores: oracle projection of each lone imprint bin (member) and "
    "empty bin (non-member) on the member's clean clipped gradient direction, in units of the "
    "claimed noise std sigma*C; non-members ~ N(0, 1) under a correct Gaussian mechanism"
)


def export_scores(records, path: str | os.PathLike) -> dict[str, int]:
    """Write the records' membership scores to ``path`` (an ``.npz``, owner-only).

    Returns:
        ``{"member": count, "nonmember": count, "audits": audits with scores}``.

    Raises:
        ValueError: no record holds membership scores (not a live imprint run, or a log
            written before this release).
    """
    parts: dict[str, list] = {k: [] for k in ("member", "nonmember")}
    meta: dict[str, list] = {f"{k}_{m}": [] for k in parts for m in ("step", "sigma", "clip")}
    audits, delta = 0, float("nan")
    for record in records:
        if record.delta is not None:
            delta = float(record.delta)
        block = (record.evidence or {}).get("membership")
        if not block:
            continue
        audits += 1
        for kind in parts:
            values = decode_floats(block[kind])
            parts[kind].append(values)
            meta[f"{kind}_step"].append(np.full(values.size, record.step, dtype=np.int64))
            for key, name in (("sigma", "noise_multiplier"), ("clip", "max_grad_norm")):
                meta[f"{kind}_{key}"].append(np.full(values.size, float(block[name])))
    if not audits:
        raise ValueError(
            "this log holds no membership scores: they come from live imprint audits (an "
            "ImprintBlock in the model) recorded by this release or later"
        )
    arrays = {k: np.concatenate(v) for k, v in {**parts, **meta}.items()}
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, delta=np.float64(delta), description=np.str_(DESCRIPTION), **arrays)
    return {
        "member": int(arrays["member"].size),
        "nonmember": int(arrays["nonmember"].size),
        "audits": audits,
    }
