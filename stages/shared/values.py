"""Small helpers for row values as Parquet and pandas hand them back."""

from __future__ import annotations

import math
from typing import Any


def missing(value: Any) -> bool:
    """None, NaN or pandas' NA: a value that was never measured."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ == "NAType"
