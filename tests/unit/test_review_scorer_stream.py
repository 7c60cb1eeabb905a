"""Review findings in ScoreStream and the client's ScoreSession, each reproduced on a real grpc.aio
server on loopback with fake models (each text's ids are its characters' codes, its reward their sum)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from synpref.client import AsyncRewardClient
from synpref.services.scorer.batcher import Batcher
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import ModelRegistry, ServedModel
from synpref.services.scorer.servicer import SERVICE_NAME, RewardServicer, add_to_server
from synpref.shared.config import ScorerSettings
from synpref.v1 import reward_pb2, reward_pb2_grpc


class Gate:
    """A forward that blocks until opened."""

    def __init__(self, opened: bool = False) -> None:
        self.open = threading.Event()
        if opened:
            self.open.set()

    def __call__(self, batch: list[list[int]]) -> list[float]:
        assert self.open.wait(10), "test forgot to open the gate"
        return [float(sum(x)) for x in batch]


class _Encoder:
    def text(self, text: str, what: str) -> list[int]:
        return [ord(c) for c in text]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def _scorer(gates: dict[str, Gate]) -> tuple[grpc.aio.Server, str, ModelRegistry, dict[str, Batcher]]:
    metrics = ScorerMetrics()
    registry = ModelRegistry(ScorerSettings(default_model="best"), metrics)
    batchers = {}
    for name, gate in gates.items():
        b = Batcher(gate, name=name, max_batch_tokens=10_000, max_batch_items=64, max_wait_ms=0.0, max_queue=100_000)
        b.start()
        batchers[name] = b
        registry.models[name] = ServedModel(name, f"/m/{name}", "v1", None, _Encoder(), b)  # type: ignore[arg-type]
    server = grpc.aio.server()
    add_to_server(RewardServicer(registry, metrics, max_request_items=16), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", registry, batchers


async def _stop(server: grpc.aio.Server, gates: dict[str, Gate], batchers: dict[str, Batcher]) -> None:
    for gate in gates.values():
        gate.open.set()
    await server.stop(0)
    for b in batchers.values():
        await b.close()


def _text(model: str, text: str) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(model=model, items=[reward_pb2.ScoreItem(text=text)])


def test_a_stream_that_writes_without_reading_has_a_bounded_number_of_messages_in_flight() -> None:
    # Every message was read and queued at once: a client writing without reading (or faster than the
    # model scores) grew the server's memory and the model's queue without bound, and filled max_queue
    # for every other caller. Now the stream stops reading; flow control holds the client's writes.
    gates = {"best": Gate()}

    async def main() -> None:
        server, address, _, batchers = await _scorer(gates)
        b = batchers["best"]
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                call = reward_pb2_grpc.RewardServiceStub(channel).ScoreStream()
                n = 200

                async def write() -> None:
                    for i in range(n):
                        await call.write(_text("", "a" * (i + 1)))
                    await call.done_writing()

                writer = asyncio.ensure_future(write())
                await asyncio.sleep(0.5)
                assert b.depth + len(b._deferred) <= 32  # before: all 200 read and queued
                gates["best"].open.set()
                got = [(await call.read()).rewards[0] for _ in range(n)]
                assert got == [97.0 * (i + 1) for i in range(n)]  # all answered, in order
                assert await call.code() == grpc.StatusCode.OK
                await writer
        finally:
            await _stop(server, gates, batchers)

    run(main())


def test_stream_metrics_are_labelled_with_the_model_the_messages_name() -> None:
    # Every ScoreStream was counted under the default model, whatever model its messages named.
    gates = {"best": Gate(opened=True), "gold": Gate(opened=True)}

    async def main() -> None:
        server, address, registry, batchers = await _scorer(gates)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                got = [r.rewards[0] async for r in stub.ScoreStream(iter([_text("gold", "ab")] * 2), timeout=5)]
                assert got == [195.0, 195.0]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.ScoreStream(iter([_text("nope", "ab")]), timeout=5):
                        pass
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            page = ""
            for _ in range(100):  # the server counts a stream as its handler ends, maybe after the client saw it
                page = registry.metrics.render().decode()
                if "ScoreStream" in page and 'code="NOT_FOUND"' in page:
                    break
                await asyncio.sleep(0.01)
            assert 'synpref_scorer_requests_total{code="OK",method="ScoreStream",model="gold"} 1.0' in page
            assert 'synpref_scorer_requests_total{code="NOT_FOUND",method="ScoreStream",model="unknown"} 1.0' in page
            assert 'method="ScoreStream",model="best"' not in page
        finally:
            await _stop(server, gates, batchers)

    run(main())


def test_closing_a_session_on_a_hung_server_returns_within_the_timeout() -> None:
    # close() (and so `async with client.stream()`) waited for the server's status with no bound:
    # the stream has no deadline, so a hung server or a network partition blocked the caller forever.
    async def hang(requests: AsyncIterator[reward_pb2.ScoreRequest], context: grpc.aio.ServicerContext):
        async for _ in requests:
            yield reward_pb2.ScoreResponse(rewards=[1.0])
            await asyncio.Event().wait()  # answers once, then never reads or ends

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            hang,
            request_deserializer=reward_pb2.ScoreRequest.FromString,
            response_serializer=reward_pb2.ScoreResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"ScoreStream": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with AsyncRewardClient(f"127.0.0.1:{port}", timeout=0.5) as c:
                session = c.stream()
                assert await session.score(["x"]) == [1.0]
                call = session._call
                t0 = time.monotonic()
                await asyncio.wait_for(session.close(), 5)  # before: TimeoutError, close never returned
                assert time.monotonic() - t0 < 2
                assert call.cancelled()
        finally:
            await server.stop(0)

    run(main())


class _BrokenEncoder:
    def text(self, text: str, what: str) -> list[int]:
        raise RuntimeError("tokenizer crashed")


def test_an_unexpected_error_is_counted_as_unknown_not_ok() -> None:
    # Before: an exception that is no ScorerError reached the caller as UNKNOWN but was counted code="OK".
    gates = {"best": Gate(opened=True)}

    async def main() -> None:
        server, address, registry, batchers = await _scorer(gates)
        registry.models["best"].encoder = _BrokenEncoder()  # type: ignore[assignment]
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = reward_pb2_grpc.RewardServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await stub.Score(_text("best", "ab"), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as stream:
                    async for _ in stub.ScoreStream(iter([_text("best", "ab")]), timeout=5):
                        pass
                assert unary.value.code() == stream.value.code() == grpc.StatusCode.UNKNOWN
            page = ""
            for _ in range(100):  # the server counts a stream as its handler ends, maybe after the client saw it
                page = registry.metrics.render().decode()
                if 'method="ScoreStream"' in page:
                    break
                await asyncio.sleep(0.01)
            for method in ("Score", "ScoreStream"):
                assert f'synpref_scorer_requests_total{{code="UNKNOWN",method="{method}",model="best"}} 1.0' in page
            assert 'code="OK"' not in page
        finally:
            await _stop(server, gates, batchers)

    run(main())
