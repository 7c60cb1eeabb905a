"""Waiting for a condition without guessing how long it takes."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Return as soon as predicate() is truthy; raise TimeoutError naming `what` after timeout_s.

    The predicate is checked once more at the deadline, so a slow last poll still counts.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            if predicate():
                return
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
