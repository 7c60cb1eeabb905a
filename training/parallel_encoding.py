"""Pairs tokenized in worker processes, in input order, for the token cache.

One process encodes about 1,600 pairs a second (0.6 ms a pair: the chat template and the Rust tokenizer for each
side, more with left_turns), so the cache of 40M pairs took some 7 hours before the first step. Workers come from
a forkserver that imported this module once (no CUDA context and none of the trainer's memory is inherited), and
each unpickles the tokenizer once. The first INLINE_PAIRS pairs are encoded in this process, so a small input never
waits for workers to start. The forkserver is stopped with the workers (close()) when this object started it: with the
preloaded modules it is ~560 MB resident (~290 MB its proportional share), and it stayed up for the whole training run.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain, islice
from typing import Any

from synpref.shared.cpus import usable_cpu_count
from synpref.shared.modeling import Encoded, encode_pair

log = logging.getLogger(__name__)

Row = Mapping[str, Any] | None
Sides = tuple[Encoded, Encoded] | None
Pending = deque[tuple[list[Row], "Future[list[Sides]] | None"]]

# About as long to encode here as workers take to start.
INLINE_PAIRS = 4096
CHUNK_PAIRS = 256
# Chunks in flight per worker: enough to keep each busy while this process writes, few enough to bound memory.
AHEAD = 2
AUTO_MAX_WORKERS = 16
LOG_EVERY = 200_000

_job: tuple[Any, int, str] | None = None


def resolve_workers(requested: int) -> int:
    """`encode_workers`: 0 is the CPUs this process can use (at most AUTO_MAX_WORKERS), 1 encodes in this process."""
    return requested if requested > 0 else min(usable_cpu_count(), AUTO_MAX_WORKERS)


def _start_worker(tokenizer: Any, max_length: int, truncation: str) -> None:
    global _job
    _job = (tokenizer, max_length, truncation)


def _encode_chunk(rows: list[Row]) -> list[Sides]:
    assert _job is not None, "worker started without its tokenizer"
    tokenizer, max_length, truncation = _job
    return [None if row is None else encode_pair(tokenizer, row, max_length, truncation) for row in rows]  # type: ignore[arg-type]


class PairEncoding:
    """`map(rows)` yields (row, its encoded chosen and rejected) in input order; a None row (unreadable) yields
    (None, None). Workers start on the first input longer than INLINE_PAIRS and serve every later `map`; close()
    stops them (also on leaving a `with` block)."""

    def __init__(self, tokenizer: Any, max_length: int, truncation: str, workers: int = 1) -> None:
        self.job = (tokenizer, max_length, truncation)
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        # Whether this object's pool started multiprocessing's forkserver (one per process), so close() stops it;
        # one that was up before belongs to someone else in the process and stays.
        self.started_forkserver = False
        self.done = 0
        self.started = time.monotonic()

    def __enter__(self) -> PairEncoding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)  # waits for the workers to exit
            self.pool = None
        if self.started_forkserver:
            self.started_forkserver = False
            _stop_forkserver()

    def map(self, rows: Iterable[Row]) -> Iterator[tuple[Row, Sides]]:
        it = iter(rows)
        if self.workers <= 1:
            yield from ((row, self._inline(row)) for row in it)
            return
        # The first rows are encoded here while the workers start on the ones after them (a start costs seconds).
        head = list(islice(it, INLINE_PAIRS)) if self.pool is None else []
        rest = list(islice(it, 1))
        if not rest:
            yield from ((row, self._inline(row)) for row in head)
            return
        yield from self._pooled(chain(rest, it), head)

    def _inline(self, row: Row) -> Sides:
        tokenizer, max_length, truncation = self.job
        self._count(1)
        return None if row is None else encode_pair(tokenizer, row, max_length, truncation)  # type: ignore[arg-type]

    def _fill(self, pending: Pending, it: Iterator[Row]) -> None:
        while len(pending) < AHEAD * self.workers and (chunk := list(islice(it, CHUNK_PAIRS))):
            pending.append((chunk, None))  # queued before submitting: a failed start loses no pair
            pending[-1] = (chunk, self._pool().submit(_encode_chunk, chunk))

    def _pooled(self, it: Iterator[Row], head: list[Row]) -> Iterator[tuple[Row, Sides]]:
        pending: Pending = deque()
        try:
            self._fill(pending, it)
        except (BrokenProcessPool, OSError) as exc:
            yield from self._fall_back(exc, chain(head, (row for chunk, _ in pending for row in chunk), it))
            return
        yield from ((row, self._inline(row)) for row in head)
        try:
            while True:
                self._fill(pending, it)
                if not pending:
                    return
                chunk, future = pending[0]
                encoded = future.result()  # type: ignore[union-attr]
                pending.popleft()
                self._count(len(chunk))
                yield from zip(chunk, encoded, strict=True)
        except (BrokenProcessPool, OSError) as exc:
            yield from self._fall_back(exc, chain((row for chunk, _ in pending for row in chunk), it))

    def _fall_back(self, exc: BaseException, rows: Iterator[Row]) -> Iterator[tuple[Row, Sides]]:
        # A worker killed (the OOM killer) or unable to start (a script without a __main__ guard): the pairs not yet
        # handed out are encoded here, in order.
        log.warning("token cache: the encoding workers failed (%s); encoding the rest in this process", exc)
        self.close()
        self.workers = 1
        yield from ((row, self._inline(row)) for row in rows)

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            context = multiprocessing.get_context("forkserver")
            # The tokenizer's module too (transformers): imported once, not by each worker as it unpickles it.
            context.set_forkserver_preload([m for m in (__name__, type(self.job[0]).__module__) if m != "__main__"])
            log.info("token cache: encoding on %d worker processes", self.workers)
            self.started_forkserver = self.started_forkserver or _forkserver_running() is False
            self.pool = ProcessPoolExecutor(self.workers, context, _start_worker, self.job)
        return self.pool

    def _count(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if before // LOG_EVERY != self.done // LOG_EVERY:
            rate = self.done / max(time.monotonic() - self.started, 1e-9)
            log.info("token cache: %d pairs encoded (%.0f a second)", self.done, rate)


def _forkserver_running() -> bool | None:
    """Whether multiprocessing's forkserver is up in this process; None where this Python does not say (a private
    attribute of CPython's multiprocessing.forkserver), so that the server is then left alone."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    if server is None or not hasattr(server, "_forkserver_pid"):
        return None
    return server._forkserver_pid is not None


def _stop_forkserver() -> None:
    # ForkServer._stop closes the server's "alive" pipe (it exits on EOF), waits for it and removes its socket; a
    # later pool starts a new one. A Python without it leaves the server up.
    stop = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_stop", None)
    if stop is None:
        return
    try:
        stop()
    except OSError as exc:  # already gone (reaped, its socket removed): nothing left to stop
        log.warning("token cache: stopping the encoding forkserver: %s", exc)
