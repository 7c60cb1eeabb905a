"""What forwards cost: the batcher's plan of its queued items into forwards (plan_batches), and how
long queued work will take, for its deadline admission (ForwardCost).

A forward's seconds are fitted as a fixed cost plus a cost per token (least squares over recent
forwards, older ones weighted down), as plan_batches models them. A plain average cost per token
would carry tiny forwards' fixed cost into every token: after a run of one-item requests it
overstated a long request's wait many times over, and the batcher shed it on an idle server.
"""

from __future__ import annotations

from collections.abc import Sequence

DECAY = 0.9
"""Weight of the previous fit against one new forward."""


class ForwardCost:
    """Recent forwards' seconds against their tokens, fitted as fixed + per_token x tokens."""

    def __init__(self) -> None:
        self._n = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        """One forward of `tokens` tokens took `seconds`."""
        self._n = DECAY * self._n + 1.0
        self._x = DECAY * self._x + tokens
        self._y = DECAY * self._y + seconds
        self._xx = DECAY * self._xx + tokens * tokens
        self._xy = DECAY * self._xy + tokens * seconds

    def fit(self) -> tuple[float, float]:
        """(fixed seconds per forward, seconds per token); (0, 0) before any forward. Forwards of one size
        cannot separate the two: then it is their mean cost per token, with no fixed part."""
        if not self._n:
            return 0.0, 0.0
        spread = self._n * self._xx - self._x * self._x
        per_token = (self._n * self._xy - self._x * self._y) / spread if spread > 1e-9 * self._n * self._xx else 0.0
        if per_token <= 0.0:
            return 0.0, self._y / max(self._x, 1.0)
        return max(0.0, (self._y - per_token * self._x) / self._n), per_token

    def seconds(self, tokens: int, forwards: int) -> float:
        """Estimated seconds for `tokens` tokens computed in `forwards` forwards."""
        fixed, per_token = self.fit()
        return fixed * forwards + per_token * tokens


def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_batch_items: int, overhead_tokens: int = 32
) -> list[list[int]]:
    """Indices grouped into forwards of least estimated cost.

    Items are sorted by length and cut into contiguous groups; a group of n items whose
    longest has L tokens costs `overhead_tokens + n * L` (padded tokens plus the fixed cost
    of one forward, in token-equivalents) and must fit max_batch_items and, unless it is a
    single item, max_batch_tokens padded tokens. The cheapest partition (dynamic
    programming, O(items x max_batch_items)) pads little where lengths jump, and batches
    widely where forwards are costly (GPUs: large overhead) or lengths are even.
    """
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest plan for the j shortest items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sizes[j - 1]
        for i in range(j - 1, max(j - max_batch_items, 0) - 1, -1):
            count = j - i
            if count > 1 and count * longest > max_batch_tokens:
                break  # larger groups only exceed the budget further
            cost = best[i] + overhead_tokens + count * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    batches.reverse()
    return batches
