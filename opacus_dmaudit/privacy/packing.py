"""Compact encodings of number arrays for the audit log (JSON lines).

Membership scores travel as base64 float32 and noise signs as two bit planes, so a record stays
small and a resumed run or ``dmaudit report --export-scores`` reads back exactly what was written.

Example:
    >>> decode_floats(encode_floats([0.5, -1.0])).tolist()
    [0.5, -1.0]
"""

from __future__ import annotations

import base64

import numpy as np

__all__ = ["encode_floats", "decode_floats", "encode_signs", "decode_signs"]


def encode_floats(values) -> str:
    """float32 values as base64 (little-endian), for the audit log."""
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def decode_floats(text: str) -> np.ndarray:
    """The float64 values :func:`encode_floats` wrote."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(float)


def encode_signs(signs) -> str:
    """Signs in {−1, 0, +1} as base64 of two bit planes (known, positive)."""
    signs = np.asarray(signs, dtype=np.int8)
    planes = np.concatenate([np.packbits(signs != 0), np.packbits(signs > 0)])
    return f"{signs.size}:" + base64.b64encode(planes.tobytes()).decode("ascii")


def decode_signs(text: str) -> np.ndarray:
    """The signs :func:`encode_signs` wrote (int8)."""
    size, data = text.split(":", 1)
    n = int(size)
    planes = np.frombuffer(base64.b64decode(data), dtype=np.uint8)
    half = planes.size // 2
    known = np.unpackbits(planes[:half])[:n].astype(bool)
    positive = np.unpackbits(planes[half:])[:n].astype(bool)
    return np.where(known, np.where(positive, 1, -1), 0).astype(np.int8)
