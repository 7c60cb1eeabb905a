"""JSON that every parser reads: floats that are not finite (NaN, infinities) written as null.

json.dumps writes a bare NaN by default, which is not JSON: JavaScript's JSON.parse, Go and serde refuse the whole
document over it, and runs produce such floats routinely (an RM with nothing to validate on, a slice that compared
nothing, a diverged model's reward mean).
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """`value` (plain JSON values: dicts, lists, tuples, scalars) with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def strict_dumps(value: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    """`value` as strict JSON (finite_or_null; allow_nan=False raises on anything it missed, a numpy float say)."""
    return json.dumps(finite_or_null(value), indent=indent, sort_keys=sort_keys, allow_nan=False)
