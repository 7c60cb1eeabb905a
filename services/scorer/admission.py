"""How long queued work will take, for the batcher's deadline admission.

A forward's seconds are fitted as a fixed cost plus a cost per token (least squares over recent
forwards, older ones weighted down), as plan_batches models them. A plain average cost per token
would carry tiny forwards' fixed cost into every token: after a run of one-item requests it
overstated a long request's wait many times over, and the batcher shed it on an idle server.
"""

from __future__ import annotations

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
