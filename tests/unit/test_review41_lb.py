"""Session 41's review: RL clients' gRPC calls spread over every scorer replica.

A gRPC client keeps one HTTP/2 connection and kube-proxy balances connections, so every call of a running client
went to the pod it first reached, and pods the HPA added got nothing from it. Two fixes, each against real scorers
on loopback with a fake model (reward = token count, plus an offset that tells the replicas apart):
the server closes connections after scorer.max_connection_age_s (GOAWAY; calls in flight finish, a stream past
the grace is reopened by the client), and the client's channel uses round_robin over every address its target
resolves to (the chart's headless Service lists every pod).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from synpref.client import AsyncRewardClient, RewardClient, ScoreSession
from synpref.client.client import _Policy
from synpref.services.scorer.server import BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.v1 import reward_pb2
from testing.scorer_fakes import LengthBackend
from testing.tiny import build_tiny_tokenizer

TEXT = "a reward call during a rollout"
CALLS_FOR_S = 4.0


class OffsetBackend(LengthBackend):
    """Reward = token count + `offset`: which replica answered shows in the reward."""

    def __init__(self, tokenizer: Any, offset: float) -> None:
        super().__init__(tokenizer)
        self.offset = offset

    def forward(self, batch: list[list[int]]) -> list[float]:
        return [r + self.offset for r in super().forward(batch)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _scorer(tokenizer: Any, offset: float = 0.0, **settings: Any) -> BackgroundScorer:
    def factory(kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> LengthBackend:
        return OffsetBackend(tokenizer, offset)

    base: dict[str, Any] = {"port": 0, "http_port": 0, "metrics_port": 0, "drain_s": 1.0, "max_wait_ms": 0.0}
    return BackgroundScorer(ScorerSettings(models={"best": ModelRef(path="fake")}, **base, **settings), factory)


@pytest.fixture
def two_scorers(tokenizer: Any) -> Iterator[tuple[BackgroundScorer, BackgroundScorer]]:
    first = _scorer(tokenizer, offset=1000.0).start()
    second = _scorer(tokenizer, offset=2000.0).start()
    yield first, second
    first.stop(grace=1.0)
    second.stop(grace=1.0)


class ConnectionCounter:
    """A TCP proxy on loopback that counts the connections clients open through it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for task in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            pipe = asyncio.ensure_future(task)
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for pipe in list(self._pipes):
            pipe.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def test_connection_age_reconnects_clients_without_failing_a_unary_call_or_a_stream(tokenizer: Any) -> None:
    # Without a connection age the client's one connection lived as long as the client: kube-proxy never got to
    # send it to another pod. With it, the server sends GOAWAY every ~1 s here; a grace shorter than the test
    # ends the open ScoreStream too, which the client's ScoreSession must reopen without failing a call.
    scorer = _scorer(tokenizer, max_connection_age_s=1.0, max_connection_age_grace_s=0.5).start()
    expected = LengthBackend(tokenizer).forward([tokenizer(TEXT)["input_ids"]])[0]

    async def calls() -> tuple[int, int, int]:
        proxy = ConnectionCounter(scorer.server.grpc_port)
        port = await proxy.start()
        try:
            async with AsyncRewardClient(f"127.0.0.1:{port}", timeout=10.0) as client, client.stream() as session:
                end = time.monotonic() + CALLS_FOR_S

                async def unary() -> int:
                    n = 0
                    while time.monotonic() < end:
                        assert await client.score([TEXT]) == [expected]
                        n += 1
                        await asyncio.sleep(0.02)
                    return n

                async def streamed() -> int:
                    n = 0
                    while time.monotonic() < end:
                        assert await session.score([TEXT]) == [expected]
                        n += 1
                        await asyncio.sleep(0.02)
                    return n

                unary_calls, stream_calls = await asyncio.gather(unary(), streamed())
        finally:
            await proxy.close()
        return unary_calls, stream_calls, proxy.connections

    try:
        unary_calls, stream_calls, connections = asyncio.run(asyncio.wait_for(calls(), 30))
    finally:
        scorer.stop(grace=1.0)
    assert unary_calls > 20 and stream_calls > 20
    assert connections >= 3, f"{connections} connection(s) in {CALLS_FOR_S} s with a 1 s connection age"


def test_server_options_leave_connections_alone_when_the_age_is_zero() -> None:
    from synpref.services.scorer.grpc_options import server_options  # here: the old tree has no such module

    # gRPC reads a max_connection_age_ms of 0 as "close at once": 0 must mean no option at all.
    names = {name for name, _ in server_options(ScorerSettings(max_connection_age_s=0))}
    assert "grpc.max_connection_age_ms" not in names and "grpc.max_connection_age_grace_ms" not in names
    options = dict(server_options(ScorerSettings(max_connection_age_s=120, max_connection_age_grace_s=15)))
    assert options["grpc.max_connection_age_ms"] == 120_000 and options["grpc.max_connection_age_grace_ms"] == 15_000


def _both(scorers: tuple[BackgroundScorer, BackgroundScorer]) -> str:
    """A target resolving to both servers, as DNS resolves a headless Service to every ready pod."""
    first, second = scorers
    return f"ipv4:127.0.0.1:{first.server.grpc_port},127.0.0.1:{second.server.grpc_port}"


def test_blocking_client_spreads_its_calls_over_every_resolved_address(
    two_scorers: tuple[BackgroundScorer, BackgroundScorer],
) -> None:
    # gRPC's default policy, pick_first, sent every call to the first address: the second replica got nothing.
    with RewardClient(_both(two_scorers), timeout=10.0) as client:
        offsets = {client.score([TEXT])[0] // 1000 for _ in range(20)}
    assert offsets == {1, 2}


def test_async_client_and_its_sessions_spread_over_every_resolved_address(
    two_scorers: tuple[BackgroundScorer, BackgroundScorer],
) -> None:
    async def calls() -> tuple[set[float], set[float]]:
        async with AsyncRewardClient(_both(two_scorers), timeout=10.0) as client:
            unary = {(await client.score([TEXT]))[0] // 1000 for _ in range(20)}
            streamed: set[float] = set()
            for _ in range(6):  # each session's stream is one call: the streams go round the addresses
                async with client.stream() as session:
                    streamed.add((await session.score([TEXT]))[0] // 1000)
            return unary, streamed

    unary, streamed = asyncio.run(asyncio.wait_for(calls(), 30))
    assert unary == {1, 2} and streamed == {1, 2}


class _Stream:
    """A ScoreStream call as grpc.aio gives it; `broken` = its transport went away while it idled."""

    def __init__(self, broken_after: int | None) -> None:
        self.broken_after = broken_after
        self.answered = 0
        self.cancelled = False

    async def write(self, request: Any) -> None:
        if self.broken_after is not None and self.answered >= self.broken_after:
            # What grpc.aio raises when the send hits a transport the server closed (its connection age grace)
            # before the call's status reached Python (seen on real servers; a race, so faked here).
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "Internal error from Core"
            )

    async def read(self) -> Any:
        self.answered += 1
        return reward_pb2.ScoreResponse(rewards=[7.0])

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _Stub:
    def __init__(self, *broken_after: int | None) -> None:
        self.plan = list(broken_after)
        self.streams: list[_Stream] = []

    def ScoreStream(self, wait_for_ready: bool = False) -> _Stream:
        self.streams.append(_Stream(self.plan.pop(0) if self.plan else None))
        return self.streams[-1]


def test_session_reopens_a_stream_that_broke_while_it_idled() -> None:
    # A stream outliving the scorer's connection age grace is ended; the session's next write could fail with
    # INTERNAL, which is not retried: the RL caller's reward call failed although nothing was sent.
    async def calls() -> tuple[list[float], list[float], int]:
        stub = _Stub(1)  # the first stream answers once, then its transport is gone
        session = ScoreSession(stub, "", _Policy(10.0, 4, 0.001, 0.01, 256), address="test")  # type: ignore[arg-type]
        first = await session.score([TEXT])
        second = await session.score([TEXT])
        return first, second, len(stub.streams)

    first, second, streams = asyncio.run(asyncio.wait_for(calls(), 10))
    assert first == second == [7.0] and streams == 2


def test_session_still_raises_what_a_new_stream_fails_with() -> None:
    # Only a stream opened by an earlier call is retried for a failed write: a new one's failure is the caller's.
    async def call() -> None:
        stub = _Stub(0, 0, 0)
        session = ScoreSession(stub, "", _Policy(10.0, 4, 0.001, 0.01, 256), address="test")  # type: ignore[arg-type]
        await session.score([TEXT])

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(asyncio.wait_for(call(), 10))
    assert err.value.code() == grpc.StatusCode.INTERNAL
