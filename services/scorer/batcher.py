"""Cross-request dynamic batching.

Every request (gRPC Score, ScorePairs, a stream message, an HTTP shim call) hands its
token-id lists to one Batcher per served model. A single worker task coalesces the items
of concurrent requests: it waits at most `max_wait_ms` after the oldest queued item (or
less, once a full batch is queued), sorts the waiting items by length so each forward pads
little, cuts them into batches bounded by `max_batch_tokens` (padded size: items x longest)
and `max_batch_items` (plan_batches: the cut that minimises padded tokens plus a per-forward
overhead), and runs the batch holding the oldest item on a dedicated thread, so the event
loop keeps accepting requests while the model computes. Before each forward it plans again
over what is left and what arrived meanwhile. Each reward is routed back to its own request
by (job, index).

A request whose caller cancelled it, or whose deadline passed, is answered at once; its
items still queued are dropped before compute. The queue is bounded (`max_queue` items):
beyond it, submit raises Overloaded instead of growing memory.

`score_encoding` takes a request still to be tokenized: while a forward runs, its tokenizing
waits for that forward's end and runs, back to back with the others that arrived meanwhile,
before the next plan. Each would cost two to three times as much tokenized alone between
other work (cold caches: docs/scorer.md), and none could join a forward before the next plan
anyway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from synpref.services.scorer.admission import ForwardCost, plan_batches
from synpref.services.scorer.errors import DeadlineExceeded, NotReady, Overloaded, ScorerError
from synpref.services.scorer.metrics import ScorerMetrics

log = logging.getLogger(__name__)

Forward = Callable[[list[list[int]]], list[float]]
"""A batch of token-id lists in, one raw reward per list out (runs on the batcher's thread)."""
Encode = Callable[[], Sequence[list[int]]]
"""A request's tokenizing, run on the event loop: its token-id lists, or the request's own error."""

WINDOW_BATCHES = 32
"""At most this many full batches' worth of items are planned together (the pending set), so
planning stays cheap under a deep queue. Wide, because a plan sorts only what it sees: a window
of a few batches (on CPU, a dozen items) pads and splits forwards far more than sorting all
queued items does."""


@dataclass(frozen=True)
class BatchResult:
    """What one `Batcher.score` call gets back: its rewards in input order, plus timings and sizes."""

    rewards: list[float]
    queue_ms: float
    """From the request's arrival (a wait for the running forward's end to be tokenized included) until the first
    of its items started computing."""
    compute_ms: float
    """From that start until the request's last item finished."""
    tokens: int
    batch_size: int
    """Largest forward any of the request's items rode in."""


Answer = asyncio.Future[BatchResult]  # what a request's caller awaits


class _Job:
    """One request's items and the future its caller awaits."""

    __slots__ = ("arrived", "batch_size", "future", "remaining", "rewards", "started", "submitted", "timer", "tokens")

    def __init__(self, future: Answer, n: int, tokens: int, submitted: float, arrived: float) -> None:
        self.future = future
        self.rewards: list[float] = [0.0] * n
        self.remaining = n
        self.tokens = tokens
        self.submitted = submitted  # queued: max_wait_ms counts from here; queue_ms from arrival (a deferral's too)
        self.arrived = arrived
        self.started: float | None = None
        self.batch_size = 0
        self.timer: asyncio.TimerHandle | None = None

    def deliver(self, index: int, reward: float, batch_size: int, now: float) -> None:
        if self.future.done():  # cancelled or expired while its batch ran: nobody is waiting
            return
        self.rewards[index] = reward
        self.batch_size = max(self.batch_size, batch_size)
        self.remaining -= 1
        if self.remaining == 0:
            started = self.started if self.started is not None else now
            self.future.set_result(
                BatchResult(
                    rewards=self.rewards,
                    queue_ms=(started - self.arrived) * 1000.0,
                    compute_ms=(now - started) * 1000.0,
                    tokens=self.tokens,
                    batch_size=self.batch_size,
                )
            )
            if self.timer is not None:
                self.timer.cancel()

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
        if self.timer is not None:
            self.timer.cancel()


@dataclass(slots=True)
class _Item:
    job: _Job
    index: int
    ids: list[int]


class Batcher:
    """Coalesces the scoring requests for one model into padded-token-efficient forwards.

    Args:
        forward: token-id lists -> one raw reward each; runs on the batcher's single thread.
        max_batch_tokens: padded-token bound of one forward (items x longest); a single item
            may exceed it.
        max_batch_items: most items in one forward.
        max_wait_ms: longest the oldest queued item waits for a fuller batch.
        max_queue: most queued items; a `score` call that would exceed it raises Overloaded.
        overhead_tokens: the fixed cost of one forward, in tokens, used by plan_batches.
        name: the model name, in errors, metrics labels and the thread name.
        metrics: where queue depth and batch statistics go; None records nothing.
        thread_init: run first on the forward thread (its CPU binding: shared/cpus.py).

    `start` must be called on the running event loop before `score`; forwards run one at a
    time, in order.
    """

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_tokens: int,
        max_batch_items: int,
        max_wait_ms: float,
        max_queue: int,
        overhead_tokens: int = 32,
        name: str = "model",
        metrics: ScorerMetrics | None = None,
        thread_init: Callable[[], object] | None = None,
    ) -> None:
        self.forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.overhead_tokens = overhead_tokens
        self.name = name
        self.metrics = metrics
        self._queue: collections.deque[_Item] = collections.deque()
        self._pending: list[_Item] = []
        """Items taken from the queue and planned, not yet computed, oldest first."""
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        # One thread: forwards of one model run one at a time, in order.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"scorer-{name}",
            initializer=thread_init,
        )
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.forwards = 0
        # Tokens submitted and not yet computed or dropped, and the recent forwards' cost: together
        # the wait a new request would see, for admission.
        self._backlog_tokens = 0
        self._cost = ForwardCost()
        self._computing = False
        self._deferred: list[tuple[Encode, float | None, asyncio.Future[BatchResult], float]] = []
        """Requests waiting for the running forward's end to be tokenized (score_encoding), with their arrival."""
        self._purge_soon = False

    @property
    def depth(self) -> int:
        """Items waiting for a forward: queued, or taken into the planning window."""
        return len(self._queue) + len(self._pending)

    @property
    def closing(self) -> bool:
        """True once `close` has been called: `score` then raises NotReady."""
        return self._closing

    def start(self) -> None:
        """Start the worker task on the running event loop; `score` raises NotReady until this is called."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def score(self, ids: Sequence[list[int]], deadline: float | None = None) -> BatchResult:
        """Rewards for `ids` in order. `deadline` is on the event loop's clock (loop.time())."""
        self._check_open()
        # Cancelling the awaiting caller cancels the future; the worker then skips the job's items.
        return await self._submit(ids, deadline)

    async def score_encoding(self, encode: Encode, deadline: float | None = None) -> BatchResult:
        """Rewards for the ids `encode()` gives. While a forward runs, `encode` waits for its end
        and runs with the other requests that arrived meanwhile, just before the next plan;
        otherwise at once. Its exceptions are the caller's."""
        self._check_open()
        if not self._computing:
            return await self._submit(encode(), deadline)
        if self.depth + len(self._deferred) >= self.max_queue:
            raise Overloaded(
                f"model {self.name!r} has {self.depth + len(self._deferred)} items and requests queued "
                f"(max_queue={self.max_queue}): retry later"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchResult] = loop.create_future()
        if deadline is not None:
            timer = loop.call_at(deadline, _expire, future)
            future.add_done_callback(lambda _: timer.cancel())
        self._deferred.append((encode, deadline, future, loop.time()))
        future.add_done_callback(self._abandoned)
        return await future

    def _check_open(self) -> None:
        if self._closing or self._task is None:
            raise NotReady(f"model {self.name!r} is not accepting work (loading, replaced or draining)")

    def _submit(
        self, ids: Sequence[list[int]], deadline: float | None, future: Answer | None = None, arrived: float = 0.0
    ) -> Answer:
        """Queue `ids` as one job (admission checks first); the future (`future`, or a new one) of its result.
        `arrived`: when a deferred request reached the batcher (queue_ms counts from it; 0: now)."""
        loop = asyncio.get_running_loop()
        future = future or loop.create_future()
        if not ids:
            future.set_result(BatchResult(rewards=[], queue_ms=0.0, compute_ms=0.0, tokens=0, batch_size=0))
            return future
        # Nothing queued: admitted whatever its size (max_request_items may exceed max_queue: never refused idle).
        if self.depth and self.depth + len(ids) > self.max_queue:
            raise Overloaded(
                f"model {self.name!r} has {self.depth} items queued; {len(ids)} more would exceed "
                f"max_queue={self.max_queue}: retry later"
            )
        now = loop.time()
        job = _Job(future, len(ids), sum(len(x) for x in ids), now, arrived or now)
        if deadline is not None:
            if deadline <= job.submitted:
                raise DeadlineExceeded("deadline already passed on arrival")
            # Shed now (429) what would only time out later (504): the work queued ahead of this
            # request, at the recent forwards' cost, would outlast its deadline. Nothing queued ahead:
            # admitted, so a misjudged cost cannot refuse work for good (each forward corrects it).
            items, tokens = self.depth + len(ids), self._backlog_tokens + job.tokens
            forwards = max(-(-items // self.max_batch_items), -(-tokens // self.max_batch_tokens))
            wait = self._cost.seconds(tokens, forwards)
            if self._backlog_tokens and job.submitted + wait > deadline:
                raise Overloaded(
                    f"model {self.name!r} has about {wait:.1f}s of work queued, more than the request's "
                    f"{deadline - job.submitted:.1f}s deadline: retry later"
                )
            job.timer = timer = loop.call_at(deadline, _expire, future)
            future.add_done_callback(lambda _: timer.cancel())  # a cancelled caller's timer goes too
        future.add_done_callback(self._abandoned)
        for i, x in enumerate(ids):
            self._queue.append(_Item(job, i, x))
        self._queued_tokens += job.tokens
        self._backlog_tokens += job.tokens
        self._set_depth()
        self._wakeup.set()
        return future

    def _abandoned(self, future: asyncio.Future[BatchResult]) -> None:
        # A request cancelled or expired while a long forward runs must free its places in the queue now,
        # not at that forward's end: else an idle-looking scorer refuses new work (Overloaded) meanwhile.
        if not self._purge_soon and (future.cancelled() or future.exception() is not None):
            self._purge_soon = True  # one purge per loop turn, however many requests were dropped in it
            asyncio.get_running_loop().call_soon(self._purge)

    def _purge(self) -> None:
        """Drop the queued and planned items, and the requests waiting to be tokenized, nobody waits for."""
        self._purge_soon = False
        gone = [it for it in (*self._queue, *self._pending) if it.job.future.done()]
        if gone:
            self._queue = collections.deque(it for it in self._queue if not it.job.future.done())
            self._pending = [it for it in self._pending if not it.job.future.done()]
            self._queued_tokens = sum(len(it.ids) for it in self._queue)
            self._backlog_tokens -= sum(len(it.ids) for it in gone)
            self._set_depth()
        self._deferred = [d for d in self._deferred if not d[2].done()]

    def _encode_deferred(self) -> None:
        """Tokenize and queue, back to back, the requests that arrived during the forward just ended.
        Requests accepted before a drain began are queued while it runs: the drain finishes them."""
        deferred, self._deferred = self._deferred, []
        for encode, deadline, outer, arrived in deferred:
            if outer.done():  # the caller stopped waiting
                continue
            try:
                self._submit(encode(), deadline, outer, arrived)
            except Exception as exc:  # the request's own error (bad input, deadline, overload)
                outer.set_exception(exc)

    async def close(self, drain: bool = True) -> None:
        """Stop accepting; with drain, finish everything queued first, else fail it."""
        self._closing = True
        if not drain:
            for _, _, future, _ in self._deferred:
                if not future.done():
                    future.set_exception(NotReady("server shutting down"))
            self._deferred = []
            for item in [*self._pending, *self._queue]:
                item.job.fail(NotReady("server shutting down"))
                self._backlog_tokens -= len(item.ids)
            self._queue.clear()
            self._pending = []
            self._queued_tokens = 0
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
        self._set_depth()

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.name, self.depth)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._pending:
                await self._fill_window(loop)
            self._take_window()
            batch = self._next_batch()
            self._set_depth()
            if batch:
                await self._compute(loop, batch)
                self._backlog_tokens -= sum(len(it.ids) for it in batch)

    def _next_batch(self) -> list[_Item]:
        """The forward to run next: the pending items are planned together (plan_batches) and
        the group holding the oldest one is taken; the rest wait for the next plan, which also
        sees what arrived meanwhile. Planning once per forward, not once per round, lets an
        item left over from one plan batch with later arrivals of its length instead of riding
        alone or padded; taking the oldest one's group bounds every item's wait."""
        live: list[_Item] = []
        for it in self._pending:  # drop items of requests cancelled or expired while they waited
            if it.job.future.done():
                self._backlog_tokens -= len(it.ids)
            else:
                live.append(it)
        if not live:
            self._pending = []
            return []
        plan = plan_batches(
            [len(it.ids) for it in live], self.max_batch_tokens, self.max_batch_items, self.overhead_tokens
        )
        chosen = set(next(group for group in plan if 0 in group))
        self._pending = [it for i, it in enumerate(live) if i not in chosen]
        return [live[i] for i in sorted(chosen)]

    async def _fill_window(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until a full batch is queued or the oldest item has waited max_wait."""
        deadline = self._queue[0].job.submitted + self.max_wait_s
        while (
            not self._closing
            and len(self._queue) < self.max_batch_items
            and self._queued_tokens < self.max_batch_tokens
        ):
            if deadline <= loop.time():
                return
            # A timer handle, not asyncio.wait_for: no task per wait on this hot path.
            self._wakeup.clear()
            timer = loop.call_at(deadline, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()

    def _take_window(self) -> None:
        """Move queued items, oldest first, into the pending set, up to WINDOW_BATCHES full batches."""
        limit_items = self.max_batch_items * WINDOW_BATCHES
        limit_tokens = self.max_batch_tokens * WINDOW_BATCHES
        tokens = sum(len(it.ids) for it in self._pending)
        taken = 0
        while self._queue and len(self._pending) < limit_items and (not self._pending or tokens < limit_tokens):
            item = self._queue.popleft()
            tokens += len(item.ids)
            taken += len(item.ids)
            self._pending.append(item)
        self._queued_tokens -= taken

    async def _compute(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        start = loop.time()
        for it in batch:
            if it.job.started is None:
                it.job.started = start
        self._computing = True
        try:
            await self._run_forward(loop, batch)
        finally:
            self._computing = False
            self._encode_deferred()

    async def _run_forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        ids = [it.ids for it in batch]
        t0 = time.perf_counter()
        try:
            rewards = await loop.run_in_executor(self._executor, self.forward, ids)
        except Exception as exc:
            log.exception("forward of %d items failed on model %s", len(batch), self.name)
            err = ScorerError(f"model forward failed: {type(exc).__name__}: {exc}")
            for it in batch:
                it.job.fail(err)
            return
        seconds = time.perf_counter() - t0
        self.forwards += 1
        self._cost.observe(sum(len(x) for x in ids), seconds)
        now = loop.time()
        try:
            answered = len(rewards)
            if answered == len(batch):
                for it, reward in zip(batch, rewards, strict=True):
                    it.job.deliver(it.index, float(reward), len(batch), now)
            problem = None if answered == len(batch) else f"{answered} rewards for {len(batch)} items"
        except (TypeError, ValueError) as exc:
            # Not one number per item (None, a row per item): its callers fail, not the worker task, whose death
            # left every request for the model, queued or to come, waiting for ever.
            problem = f"an answer that is not one number per item ({type(exc).__name__}: {exc})"[:300]
        if problem is not None:
            log.error("forward of %d items on model %s: backend returned %s", len(batch), self.name, problem)
            err = ScorerError(f"backend returned {problem}")
            for it in batch:
                it.job.fail(err)
            return
        if self.metrics is not None:
            tokens = sum(len(x) for x in ids)
            padded = len(ids) * max(len(x) for x in ids)
            self.metrics.observe_batch(self.name, len(batch), tokens, padded, seconds)


def _expire(future: asyncio.Future[BatchResult]) -> None:
    """A request's deadline timer: answer it with DeadlineExceeded unless it is answered already."""
    if not future.done():
        future.set_exception(DeadlineExceeded("deadline passed before the items were scored"))
