"""Floating-point tolerances for tests, each derived from the arithmetic it covers.

A fixed absolute tolerance is the wrong test for floats. fp32 sums run in an order that
depends on the batch shape, the padding width, the thread count and the BLAS kernel (AMD
EPYC and Intel machines run different ones), so two correct computations differ by
rounding, and rounding scales with the size of the numbers. Where a test can make both
sides the very same operations on the same inputs, it compares with ==. Where it cannot,
it uses a bound from here, relative to the magnitude compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest

FP32_EPS = 2.0**-23
"""float32 spacing at 1.0 (torch.finfo(torch.float32).eps); one rounding moves x by <= FP32_EPS * |x| / 2."""
FP64_EPS = 2.0**-52
"""float64 spacing at 1.0 (sys.float_info.epsilon)."""

FP32_FORWARD_ULPS = 2**10
"""How far apart two fp32 forward passes may land, in FP32_EPS times the output's magnitude,
when they run the same weights on the same tokens and differ only in summation order
(batch composition, padding width, masked or unmasked attention, threads, CPU).

Measured here (AMD EPYC, oneDNN/MKL): at most 7 such units, for tiny Qwen3/Llama/BERT
rewards batched against one at a time and for the MiniLM head against its exported
checkpoint. An n-term fp32 sum errs by about sqrt(n) units of its terms' size and at
worst n (Higham's gamma_n); these models sum at most 64 to 1536 terms per reduction, and
their norm layers keep errors from compounding across layers. 2**10 units (1.2e-4
relative) leaves over 100x room for another CPU's kernels and stays 10x below what a real
bug moves a reward: attending to padding changes a tiny BERT's rewards by 1.3e-3 to
1.2e-2 relative.
"""


def fp32_forward_tolerance(magnitude: float) -> float:
    """Bound on |a - b| for two fp32 forward passes (see FP32_FORWARD_ULPS) whose outputs
    are at most `magnitude` in absolute value."""
    return FP32_FORWARD_ULPS * FP32_EPS * magnitude


def approx_fp32_forward(expected: float | Sequence[float], scale: float | None = None) -> Any:
    """pytest.approx(expected) within fp32_forward_tolerance of `scale`, by default the
    largest |value| in `expected` (the size of the rewards being compared)."""
    values = [expected] if isinstance(expected, int | float) else list(expected)
    magnitude = max(abs(v) for v in values) if scale is None else scale
    return pytest.approx(expected, rel=0, abs=fp32_forward_tolerance(magnitude))


def near_ties(rewards: Iterable[tuple[float, float]], tolerance: float) -> int:
    """How many (r_chosen, r_rejected) pairs have |r_chosen - r_rejected| <= 2 * tolerance.

    When two scorings of the same model differ by at most `tolerance` per reward, only
    these pairs can change sides, so the two numbers of correctly ordered pairs differ by
    at most this count (usually 0, so the accuracies are then equal).
    """
    return sum(abs(c - r) <= 2 * tolerance for c, r in rewards)
