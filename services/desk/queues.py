"""Where the desk's pairs come from and where its decisions go.

A source hands out (record, handle) pairs and is told, by handle, which ones are
settled; a sink writes routed records and returns only once they are durable. The
desk acknowledges a handle only after the sink has written the pair's decision, so a
crash in between re-delivers the pair (at-least-once) instead of losing it.

The in-memory pair below is the embedded default used by `synpref run`; the Kafka pair
lives in kafka_queue.py.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from synpref.shared.stage import StageResult
from synpref.v1.pair_pb2 import PairRecord


class ReviewSource(Protocol):
    """Where the desk gets pairs to review: (record, handle) pairs, acknowledged by handle once settled."""

    async def fetch(self, limit: int) -> list[tuple[PairRecord, Any]]:
        """Up to `limit` new pairs, without blocking for long; [] when none wait. limit 0 = keep-alive."""
        ...

    async def ack(self, handles: list[Any]) -> None:
        """These pairs are settled (decision written, or a duplicate): never deliver them again."""
        ...

    async def close(self) -> None:
        """Release the source's connections."""
        ...


class VerdictSink(Protocol):
    """Where the desk writes its decisions; a write is durable when it returns."""

    async def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        """Write (route, record) items, route a TopicSettings field; durable when this returns."""
        ...

    async def close(self) -> None:
        """Release the sink's connections."""
        ...


class MemoryReviewQueue:
    """Pairs pushed in by the embedded loop (any thread), handed to the desk in order."""

    def __init__(self) -> None:
        self._items: deque[PairRecord] = deque()
        self._lock = threading.Lock()
        self.acked = 0

    def push(self, records: Iterable[PairRecord]) -> int:
        """Queue `records` for the desk (thread-safe); returns how many were queued."""
        records = list(records)
        with self._lock:
            self._items.extend(records)
        return len(records)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    async def fetch(self, limit: int) -> list[tuple[PairRecord, Any]]:
        """Take up to `limit` queued records, oldest first; their handles are None."""
        with self._lock:
            n = min(limit, len(self._items))
            return [(self._items.popleft(), None) for _ in range(n)]

    async def ack(self, handles: list[Any]) -> None:
        """Count the settled handles in `acked`; nothing else to commit in memory."""
        # Nothing to commit in memory; the count lets callers see that decisions landed.
        with self._lock:
            self.acked += len(handles)

    async def close(self) -> None:
        """Nothing to release."""
        return None


class MemoryVerdictSink:
    """Decisions kept for the embedded loop to collect with `drain`."""

    def __init__(self) -> None:
        self._routed: list[tuple[str, PairRecord]] = []
        self._cond = threading.Condition()

    async def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        """Keep `routed` for `drain` and wake a waiting `drain`."""
        with self._cond:
            self._routed.extend(routed)
            self._cond.notify_all()

    def drain(self, min_records: int = 0, timeout_s: float = 0.0) -> StageResult:
        """Take everything written so far, first waiting up to `timeout_s` for `min_records`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._routed) < min_records:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken, self._routed = self._routed, []
        return StageResult(routed=taken)

    async def close(self) -> None:
        """Nothing to release."""
        return None
