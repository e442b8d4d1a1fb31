"""Numbers in words for people: how every sink prints a value."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fmt", "count"]


def fmt(value: Any, spec: str = ".3g") -> str:
    """A number for people: ``n/a`` for missing, ``∞`` for infinite.

    Example:
        >>> fmt(0.123456), fmt(None), fmt(float("inf")), fmt(0.25, ".0%")
        ('0.123', 'n/a', '∞', '25%')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if isinstance(value, int | float):
        return format(value, spec)
    return str(value)


def count(n: int, noun: str) -> str:
    """``"1 image"``, ``"3 images"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
