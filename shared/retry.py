"""Capped exponential back-off, for callers that ask again a service that is briefly away."""

from __future__ import annotations

from collections.abc import Callable, Iterator


def capped_backoff(failures: int, max_s: float, first_s: float = 1.0) -> float:
    """first_s doubled for each failure in a row after the first, at most max_s. The exponent is capped too:
    2.0 ** 1024 overflows, after some 8.5 hours of 30 s pauses (a gold scorer waiting for models the
    controller is still training)."""
    return min(max_s, first_s * 2.0 ** min(max(failures - 1, 0), 16))


def backoff_pauses(
    deadline: float, clock: Callable[[], float], max_s: float = 30.0, first_s: float = 1.0
) -> Iterator[float]:
    """The pause before each next try (capped_backoff, cut to end at `deadline` on `clock`), read as each try
    fails; it ends once the deadline has passed, which is when the caller gives up with its own error."""
    failures = 0
    while (left := deadline - clock()) > 0:
        failures += 1
        yield min(capped_backoff(failures, max_s, first_s), left)
