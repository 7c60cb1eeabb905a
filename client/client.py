"""Clients of the SynPref RewardService: `RewardClient` (blocking) and `AsyncRewardClient`,
whose `stream()` opens a `ScoreSession` for callers that score one small request after
another (an RL rollout worker): each call is a message on one ScoreStream, whose gRPC handling
costs the server about half that of a unary call (docs/scorer.md, serving overhead).

    with RewardClient("127.0.0.1:50060") as rm:
        rewards = rm.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])
        scores = rm.score_pairs([{"conversation": [...], "chosen": [...], "rejected": [...]}])

An item is a conversation (messages ending in the assistant response to score), text
already rendered with the chat template, or `TokenIds` of that text made with the served
model's own tokenizer (an RL worker whose policy shares it has them from generation; the
server then skips tokenizing, most of its serving cost; `check_tokenizer` verifies first).

`timeout` bounds a whole call (every chunk and retry); large batches are cut into chunks
of at most `chunk_size` items (the server refuses more than its max_request_items) and
`max_request_bytes` serialized bytes (it refuses a request over its max_body_bytes, 32 MiB by
default; a single larger item goes alone); UNAVAILABLE (server starting, restarting or
draining) and RESOURCE_EXHAUSTED (queue full) are retried with capped exponential backoff
and jitter, at most `retries` times per chunk and never past the deadline. Other errors
raise grpc.RpcError at once. Bad input (a text or one conversation given as the items, a bad item,
a timeout that is not seconds in (0, 1e9]) is a ValueError, naming the item's index, before it is sent.

`address` is any gRPC target: in Kubernetes, `dns:///<release>-synpref-scorer-headless:50060`
(the chart's headless Service) spreads the calls over every scorer pod (docs/scorer.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

# Re-exported: callers import these names from synpref.client.client, where they used to be defined.
from synpref.client.channel import CHANNEL_OPTIONS as CHANNEL_OPTIONS
from synpref.client.channel import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from synpref.client.channel import RETRYABLE as RETRYABLE
from synpref.client.channel import SERVICE_CONFIG as SERVICE_CONFIG
from synpref.client.channel import TOO_LARGE as TOO_LARGE
from synpref.client.channel import Policy as _Policy
from synpref.client.channel import answered, located, request_size, rpc_error, timed_out
from synpref.client.channel import retryable as retryable
from synpref.client.channel import too_large as too_large
from synpref.client.messages import (
    MAX_REQUEST_BYTES,
    Item,
    PairDict,
    check_batch,
    check_tokenizer,
    chunks,
    converted,
    to_item,
    to_pair,
)
from synpref.v1 import reward_pb2, reward_pb2_grpc

T = TypeVar("T")


@dataclass(frozen=True)
class PairScore:
    """The score of one preference pair: each response's reward and p, the probability chosen is preferred."""

    reward_chosen: float
    reward_rejected: float
    p: float
    """sigmoid(reward_chosen - reward_rejected)"""
    version: str = ""
    """The served version of the model that scored it (a reload can change it between calls)."""


def _score_requests(items: Sequence[Item], model: str, policy: _Policy) -> Iterator[reward_pb2.ScoreRequest]:
    for run in chunks(converted(to_item, items, "item"), policy.chunk_size, policy.max_request_bytes):
        yield reward_pb2.ScoreRequest(model=model, items=run)


def _pair_requests(pairs: Sequence[PairDict], model: str, policy: _Policy) -> Iterator[reward_pb2.ScorePairsRequest]:
    # A pair is two items on the server: keep each request within chunk_size items.
    runs = chunks(converted(to_pair, pairs, "pair"), max(1, policy.chunk_size // 2), policy.max_request_bytes)
    for run in runs:
        yield reward_pb2.ScorePairsRequest(model=model, pairs=run)


def _pair_scores(response: reward_pb2.ScorePairsResponse) -> list[PairScore]:
    version = response.metadata.version
    return [PairScore(s.reward_chosen, s.reward_rejected, s.p, version) for s in response.scores]


class RewardClient:
    """Blocking client; thread-safe (one gRPC channel)."""

    def __init__(
        self,
        address: str,
        *,
        model: str = "",
        timeout: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        chunk_size: int = 256,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.address = address
        self.model = model
        self.policy = _Policy(timeout, retries, backoff_s, max_backoff_s, chunk_size, max_request_bytes)
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the gRPC channel."""
        self.channel.close()

    def _call(self, method: Callable[..., T], request: Any, deadline: float, first: int = 0) -> T:
        """method(request), retried; `first`: the index in the call of the request's first item (or pair)."""
        attempt, earlier = 0, None
        while True:
            remaining = deadline - time.monotonic()
            try:
                return answered(
                    request, method(request, timeout=max(remaining, 0.001), wait_for_ready=attempt > 0), self.address
                )
            except grpc.RpcError as exc:
                attempt += 1
                delay = self.policy.pause(attempt, deadline) if retryable(exc) else None
                if delay is None:  # B904: exc is the cause of what is raised, or is raised itself
                    raise located(timed_out(exc, earlier, self.address), request, first)  # noqa: B904
                earlier = exc
                time.sleep(delay)

    def score(self, items: Sequence[Item], *, model: str | None = None, timeout: float | None = None) -> list[float]:
        """One reward per item, in order; `model` defaults to the client's (empty: the server's default).

        Items are sent in chunks (chunk_size, max_request_bytes); `timeout` (default the client's) bounds the
        whole call.
        """
        check_batch(items, "items")
        if not items:
            return []
        deadline = self.policy.deadline(timeout)
        out: list[float] = []
        for request in _score_requests(items, model or self.model, self.policy):
            out.extend(self._call(self.stub.Score, request, deadline, len(out)).rewards)
        return out

    def score_pairs(
        self, pairs: Sequence[PairDict], *, model: str | None = None, timeout: float | None = None
    ) -> list[PairScore]:
        """One PairScore per pair, in order; chunks of chunk_size // 2 pairs (two items each on the server)."""
        check_batch(pairs, "pairs")
        if not pairs:
            return []
        deadline = self.policy.deadline(timeout)
        out: list[PairScore] = []
        for request in _pair_requests(pairs, model or self.model, self.policy):
            out.extend(_pair_scores(self._call(self.stub.ScorePairs, request, deadline, len(out))))
        return out

    def info(self, model: str = "", timeout: float | None = None) -> reward_pb2.InfoResponse:
        """The server's InfoResponse for `model` (empty: the server's default model)."""
        deadline = self.policy.deadline(timeout)
        return self._call(self.stub.Info, reward_pb2.InfoRequest(model=model), deadline)

    def check_tokenizer(self, tokenizer: Any, model: str = "") -> None:
        """ValueError unless `tokenizer` is the served model's (empty: the default): check before sending TokenIds."""
        name = model or self.model
        check_tokenizer(self.info(name), tokenizer, name)


class AsyncRewardClient:
    """asyncio client (grpc.aio). Chunks of one call run concurrently, `concurrency` at a time,
    so they batch with each other on the server."""

    def __init__(
        self,
        address: str,
        *,
        model: str = "",
        timeout: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        chunk_size: int = 256,
        concurrency: int = 4,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.address = address
        self.model = model
        self.policy = _Policy(timeout, retries, backoff_s, max_backoff_s, chunk_size, max_request_bytes)
        if concurrency < 1:  # no call could ever start: score() would wait forever, past any timeout
            raise ValueError("concurrency >= 1 is required")
        self.concurrency = concurrency
        self.channel: grpc.aio.Channel | None = None
        self._stub: reward_pb2_grpc.RewardServiceStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stub(self) -> reward_pb2_grpc.RewardServiceStub:
        """The stub on the client's channel, made on first use in the running event loop: grpc.aio binds a channel
        to the loop it is made in, so a client made in sync code (then `asyncio.run`) failed every call with
        "attached to a different loop". Used from another loop later, it says so."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("AsyncRewardClient is for coroutines: from sync code use RewardClient") from None
        if self._stub is None:
            self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._stub, self._loop = reward_pb2_grpc.RewardServiceStub(self.channel), loop
        elif self._loop is not None and loop is not self._loop:
            raise RuntimeError(
                f"this AsyncRewardClient of {self.address} serves the event loop of its first call, not this one "
                "(a second asyncio.run?): make one client per event loop, inside it"
            )
        return self._stub

    @stub.setter
    def stub(self, stub: reward_pb2_grpc.RewardServiceStub) -> None:
        self._stub, self._loop = stub, None

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the gRPC channel, if a call made it."""
        if self.channel is not None:
            await self.channel.close()

    async def _call(self, method: Callable[..., Any], request: Any, deadline: float, first: int = 0) -> Any:
        attempt, earlier = 0, None
        while True:
            remaining = deadline - time.monotonic()
            try:
                response = await method(request, timeout=max(remaining, 0.001), wait_for_ready=attempt > 0)
                return answered(request, response, self.address)
            except grpc.aio.AioRpcError as exc:
                attempt += 1
                delay = self.policy.pause(attempt, deadline) if retryable(exc) else None
                if delay is None:  # B904: exc is the cause of what is raised, or is raised itself
                    raise located(timed_out(exc, earlier, self.address), request, first)  # noqa: B904
                earlier = exc
                await asyncio.sleep(delay)

    async def _gather(self, method: Callable[..., Any], requests: Iterator[Any], deadline: float) -> list[Any]:
        """The responses in request order, at most `concurrency` calls in flight. A request is made only when its
        call can start, so a call of millions of items holds `concurrency` requests, not all of them at once."""
        responses: list[Any] = []
        running: dict[asyncio.Task[Any], int] = {}
        first = 0  # the index in the call of the next request's first item
        try:
            for request in requests:
                if len(running) >= self.concurrency:
                    await self._collect(running, responses)
                running[asyncio.ensure_future(self._call(method, request, deadline, first))] = len(responses)
                responses.append(None)
                first += request_size(request)
            while running:
                await self._collect(running, responses)
            return responses
        finally:
            for task in running:  # one chunk failed: the others' results are lost, so stop their work and retries
                task.cancel()

    @staticmethod
    async def _collect(running: dict[asyncio.Task[Any], int], responses: list[Any]) -> None:
        """Wait for a call of `running` to end and put its response in place; raise the error of a failed one."""
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        failed: BaseException | None = None
        for task in done:  # every error retrieved, raised or not: no "never retrieved" warning
            index, error = running.pop(task), task.exception()
            if error is None:
                responses[index] = task.result()
            failed = failed or error
        if failed is not None:
            raise failed

    async def score(
        self, items: Sequence[Item], *, model: str | None = None, timeout: float | None = None
    ) -> list[float]:
        """One reward per item, in order; chunks run concurrently, at most `concurrency` at a time."""
        check_batch(items, "items")
        if not items:
            return []
        deadline = self.policy.deadline(timeout)
        requests = _score_requests(items, model or self.model, self.policy)
        responses = await self._gather(self.stub.Score, requests, deadline)
        return [x for resp in responses for x in resp.rewards]

    async def score_pairs(
        self, pairs: Sequence[PairDict], *, model: str | None = None, timeout: float | None = None
    ) -> list[PairScore]:
        """One PairScore per pair, in order; chunks run concurrently, at most `concurrency` at a time."""
        check_batch(pairs, "pairs")
        if not pairs:
            return []
        deadline = self.policy.deadline(timeout)
        requests = _pair_requests(pairs, model or self.model, self.policy)
        responses = await self._gather(self.stub.ScorePairs, requests, deadline)
        return [s for resp in responses for s in _pair_scores(resp)]

    async def info(self, model: str = "", timeout: float | None = None) -> reward_pb2.InfoResponse:
        """The server's InfoResponse for `model` (empty: the server's default model)."""
        deadline = self.policy.deadline(timeout)
        return await self._call(self.stub.Info, reward_pb2.InfoRequest(model=model), deadline)

    async def check_tokenizer(self, tokenizer: Any, model: str = "") -> None:
        """ValueError unless `tokenizer` is the served model's (empty: the default): check before sending TokenIds."""
        name = model or self.model
        check_tokenizer(await self.info(name), tokenizer, name)

    def stream(self, *, model: str | None = None) -> ScoreSession:
        """A ScoreSession on this client's channel: `async with client.stream() as s: await s.score(items)`."""
        return ScoreSession(self.stub, model or self.model, self.policy, address=self.address)


class ScoreSession:
    """Scores one request after another on a single ScoreStream (opened on first use).

    For a caller that keeps asking for a few rewards at a time, gRPC's handling of a message on
    an open stream costs the server about half that of a unary Score call (with tokenizing, about
    30% less serving CPU per item, docs/scorer.md). Calls on one session run one
    at a time (concurrent ones wait their turn); run one session per concurrent caller so
    their items batch together on the server. `timeout` bounds each call, turn and retries included.
    A call that fails or times out drops the stream (a late answer must not be read as the
    next call's) and the next call opens a new one; UNAVAILABLE and RESOURCE_EXHAUSTED are
    retried on a new stream, as the unary calls are. A timeout, or an UNAVAILABLE or RESOURCE_EXHAUSTED left
    after the retries, names `address` (the client's target): a caller of several scorers can tell which one.
    """

    def __init__(self, stub: reward_pb2_grpc.RewardServiceStub, model: str, policy: _Policy, *, address: str) -> None:
        self.stub = stub
        self.model = model
        self.policy = policy
        self.address = address
        self._call: Any = None
        self._turn = asyncio.Lock()

    async def __aenter__(self) -> ScoreSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End the stream: half-close, then wait for the server's status, at most the client's
        `timeout` (the stream has no deadline: a hung server or a partition would block forever);
        past it the stream is cancelled."""
        call, self._call = self._call, None
        if call is None or call.done():
            return
        try:
            await asyncio.wait_for(self._finish(call), self.policy.timeout)
        except TimeoutError:
            pass
        finally:
            if not call.done():  # timed out, or close itself was cancelled
                call.cancel()

    @staticmethod
    async def _finish(call: Any) -> None:
        await call.done_writing()
        await call.code()

    def _drop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def _once(self, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
        fresh = self._call is None
        if fresh:
            self._call = self.stub.ScoreStream(wait_for_ready=True)
        call = self._call
        try:
            await call.write(request)
        except asyncio.InvalidStateError:  # the server ended the stream before this write
            response = grpc.aio.EOF
        except grpc.aio.AioRpcError as exc:
            if fresh:
                raise
            # An earlier call's stream broke while idle (the scorer's max_connection_age grace, a restart) and gRPC
            # failed this write, with INTERNAL: the request never left, so it is retried on a new stream.
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"the stream broke: {exc.details()}") from exc
        else:
            response = await call.read()
        if response is grpc.aio.EOF:
            # The server ended the stream with OK: it is draining. Retry on a new stream, which the
            # channel opens on a server that is not (as a new unary call would).
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
        return response

    async def score(self, items: Sequence[Item], *, timeout: float | None = None) -> list[float]:
        """One reward per item, in order, as one message (at most the server's max_request_items items)."""
        check_batch(items, "items")
        if not items:
            return []
        deadline = self.policy.deadline(timeout)
        request = reward_pb2.ScoreRequest(model=self.model, items=list(converted(to_item, items, "item")))
        try:  # the wait for the turn counts: a slow or hung call before this one must not hold it past its timeout
            if self._turn.locked():
                await asyncio.wait_for(self._turn.acquire(), max(deadline - time.monotonic(), 0.001))
            else:
                await self._turn.acquire()  # free: taken at once, without wait_for's task
        except TimeoutError:
            turn = f"waited past the timeout for its turn on the stream to {self.address}"
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, turn) from None
        try:
            attempt, earlier = 0, None
            while True:
                try:
                    response = await asyncio.wait_for(self._once(request), max(deadline - time.monotonic(), 0.001))
                    return list(answered(request, response, self.address).rewards)
                except TimeoutError:
                    self._drop()
                    details = f"no answer from {self.address} on the stream within the timeout"
                    if earlier is not None:  # what the retries were waiting out, as the unary calls say
                        details += f", waiting after {earlier.code().name}: {earlier.details()}"
                    raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, details) from earlier
                except grpc.aio.AioRpcError as exc:
                    self._drop()
                    attempt += 1
                    delay = self.policy.pause(attempt, deadline) if retryable(exc) else None
                    if delay is None and (retryable(exc) or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                        # Out of retries or time: say which scorer, as the timeouts above do.
                        raise rpc_error(exc.code(), f"{exc.details()} (stream to {self.address})") from exc
                    if delay is None:
                        raise
                    earlier = exc
                    await asyncio.sleep(delay)
                except BaseException:
                    self._drop()  # cancelled mid-call: the answer would arrive for the next one
                    raise
        finally:
            self._turn.release()
