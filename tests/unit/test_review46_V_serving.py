"""Session 46's review of the scorer's serving path (area V): each finding reproduced with fake models (rewards
from the ids, texts' ids their characters' codes) on loopback servers or a bare Batcher, so no checkpoint is
loaded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from synpref.services.scorer.batcher import Batcher
from synpref.services.scorer.errors import ScorerError
from synpref.services.scorer.http import HttpShims
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import INLINE_ENCODE_BYTES, ModelRegistry, ServedModel
from synpref.services.scorer.server import _serve_http
from synpref.services.scorer.servicer import RewardServicer, add_to_server
from synpref.shared.config import ScorerSettings
from synpref.v1 import pair_pb2, reward_pb2, reward_pb2_grpc
from testing.scorer_fakes import CharEncoder


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def _lengths(batch: list[list[int]]) -> list[float]:
    return [float(len(x)) for x in batch]


# --- 1. an error message echoing a long client string broke the gRPC status: RESOURCE_EXHAUSTED, retried -------


class _Encoder(CharEncoder):
    """CharEncoder that also validates conversations as the real Encoder does (roles named in its errors)."""

    def conversation(self, messages: list[dict[str, str]], what: str) -> list[int]:
        from synpref.services.scorer.encoding import validate_messages

        return [ord(c) for m in validate_messages(messages, what) for c in m["content"]]


@contextlib.asynccontextmanager
async def _grpc_scorer() -> AsyncIterator[reward_pb2_grpc.RewardServiceStub]:
    metrics = ScorerMetrics()
    registry = ModelRegistry(ScorerSettings(default_model="best"), metrics)
    b = Batcher(_lengths, name="best", max_batch_tokens=10_000, max_batch_items=64, max_wait_ms=0.0, max_queue=1000)
    b.start()
    registry.models["best"] = ServedModel("best", "/m/best", "v1", None, _Encoder(), b)  # type: ignore[arg-type]
    server = grpc.aio.server()
    add_to_server(RewardServicer(registry, metrics, max_request_items=16), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield reward_pb2_grpc.RewardServiceStub(channel)
    finally:
        await server.stop(0)
        await b.close()
        registry._encode_pool.shutdown(wait=False)


def test_a_client_error_naming_a_long_string_keeps_its_status_code() -> None:
    # The message of an unknown model (or role) repeats what the client sent. A status message over gRPC's
    # metadata limit (16 KiB) failed at the client as RESOURCE_EXHAUSTED, "received metadata size exceeds
    # hard limit": synpref.client retried the bad request as an overload until its timeout.
    async def main() -> None:
        async with _grpc_scorer() as stub:
            item = reward_pb2.ScoreItem(text="hello")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Score(reward_pb2.ScoreRequest(model="m" * 40_000, items=[item]), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
            assert "no model named 'mmm" in err.value.details()
            assert len(err.value.details()) < 4096

            turn = pair_pb2.Message(role="é" * 20_000, content="hi")  # UTF-8 and percent-encoding: 6 bytes each
            conversation = reward_pb2.ScoreItem(conversation=reward_pb2.Conversation(messages=[turn]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Score(reward_pb2.ScoreRequest(model="best", items=[conversation]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "has role 'ééé" in err.value.details()

            stream = stub.ScoreStream()
            await stream.write(reward_pb2.ScoreRequest(model="s" * 40_000, items=[item]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stream.read()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()

    run(main())


# --- 2. queue_ms left out the wait of a request that arrived while a forward ran -----------------------------


def test_queue_ms_counts_the_wait_for_the_running_forward() -> None:
    # A small request arriving while a forward runs waits for that forward's end to be tokenized and queued
    # (score_encoding); queue_ms started at that end, so under load (a forward always running) every
    # request's Metadata said it hardly queued while its latency was a forward longer.
    async def main() -> None:
        gate = threading.Event()

        def forward(batch: list[list[int]]) -> list[float]:
            assert gate.wait(10)
            return _lengths(batch)

        b = Batcher(forward, name="best", max_batch_tokens=1000, max_batch_items=16, max_wait_ms=0.0, max_queue=64)
        b.start()
        try:
            first = asyncio.ensure_future(b.score_encoding(lambda: [[1, 2]]))
            while not b._computing:
                await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            second = asyncio.ensure_future(b.score_encoding(lambda: [[1, 2, 3]]))
            await asyncio.sleep(0.3)
            gate.set()
            result = await second
            waited_ms = (time.perf_counter() - t0) * 1000.0
            await first
        finally:
            gate.set()
            await b.close()
        assert result.rewards == [3.0]
        assert result.queue_ms >= 250.0, result
        assert result.queue_ms + result.compute_ms <= waited_ms + 1.0

    run(main())


def test_a_deferred_request_whose_deadline_passed_meanwhile_is_still_refused() -> None:
    # The arrival time now dates queue_ms; the deadline is still checked against the time it is queued at.
    async def main() -> None:
        gate = threading.Event()

        def forward(batch: list[list[int]]) -> list[float]:
            assert gate.wait(10)
            return _lengths(batch)

        b = Batcher(forward, name="best", max_batch_tokens=1000, max_batch_items=16, max_wait_ms=0.0, max_queue=64)
        b.start()
        loop = asyncio.get_running_loop()
        try:
            first = asyncio.ensure_future(b.score_encoding(lambda: [[1, 2]]))
            while not b._computing:
                await asyncio.sleep(0.005)
            late = asyncio.ensure_future(b.score_encoding(lambda: [[1, 2, 3]], loop.time() + 0.1))
            await asyncio.sleep(0.3)
            gate.set()
            with pytest.raises(ScorerError, match="deadline"):
                await late
            assert (await first).rewards == [2.0]
        finally:
            gate.set()
            await b.close()

    run(main())


# --- 3. an HTTP request waiting for an encoding thread was not answered at its deadline ------------------------


class _SlowEncoder(CharEncoder):
    """Tokenizing a text takes `seconds` (a large request on a busy encoding thread)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def text(self, text: str, what: str) -> list[int]:
        time.sleep(self.seconds)
        return super().text(text, what)


async def _post(port: int, body: bytes, timeout_s: float) -> tuple[int, dict[str, Any], float]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"POST /get_reward HTTP/1.1\r\nHost: x\r\nX-Request-Timeout: {timeout_s}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2]), time.perf_counter() - t0


def test_an_http_request_waiting_for_an_encoding_thread_gets_504_at_its_deadline() -> None:
    # A request over INLINE_ENCODE_BYTES is tokenized on the encoding threads. Its deadline was checked only
    # once a thread took it: behind other large requests it waited for the thread whatever its deadline (gRPC
    # cancels the call at its deadline; HTTP has nothing else), and answered 504 that much later.
    async def main() -> None:
        metrics = ScorerMetrics()
        registry = ModelRegistry(ScorerSettings(), metrics)
        registry._encode_pool.shutdown()
        registry._encode_pool = ThreadPoolExecutor(max_workers=1)  # one encoding thread, kept busy below
        runner, port = await _serve_http(HttpShims(registry, metrics, 16, timeout_s=10.0).app(), "127.0.0.1", 0)
        b = Batcher(_lengths, name="best", max_batch_tokens=10**7, max_batch_items=16, max_wait_ms=0.0, max_queue=64)
        b.start()
        registry.models["best"] = ServedModel("best", "/m/best", "v1", None, _SlowEncoder(1.5), b)  # type: ignore[arg-type]
        body = json.dumps({"query": ["x" * (INLINE_ENCODE_BYTES + 1)]}).encode()
        try:
            busy = asyncio.ensure_future(_post(port, body, 10.0))
            await asyncio.sleep(0.3)  # the thread is tokenizing `busy` for 1.5 s
            status, answer, seconds = await _post(port, body, 0.3)
            assert status == 504, answer
            assert seconds < 1.0, f"answered after {seconds:.2f} s, deadline 0.3 s"
            assert (await busy)[0] == 200
        finally:
            await runner.cleanup()
            await b.close()
            registry._encode_pool.shutdown(wait=False)

    run(main())


# --- 4. a forward whose answer was not one number per item killed the model's batcher -------------------------


def test_a_forward_answering_no_numbers_fails_its_batch_and_the_batcher_serves_on() -> None:
    # Only the forward call itself was guarded: an answer that len() or float() refuses (a backend returning
    # None, or a row per item) raised in the worker task, which died. Every request then queued for the model,
    # before and after, waited for ever (gRPC calls without a deadline) while health said SERVING.
    answers: list[Any] = [None, [[1.0, 2.0]], "x"]

    def forward(batch: list[list[int]]) -> Any:
        return answers.pop(0) if answers else _lengths(batch)

    async def main() -> None:
        b = Batcher(forward, name="best", max_batch_tokens=1000, max_batch_items=16, max_wait_ms=0.0, max_queue=64)
        b.start()
        try:
            for _ in range(3):
                with pytest.raises(ScorerError, match="backend returned") as err:
                    await asyncio.wait_for(b.score([[1, 2, 3]]), 5)
                assert err.value.code == grpc.StatusCode.INTERNAL
            assert (await asyncio.wait_for(b.score([[1, 2, 3], [4]]), 5)).rewards == [3.0, 1.0]
        finally:
            await b.close()

    run(main())


def test_an_http_error_naming_a_long_string_is_cut() -> None:
    # A 404 for a body whose "model" held megabytes answered them back, escaped, in the error message.
    async def main() -> None:
        metrics = ScorerMetrics()
        registry = ModelRegistry(ScorerSettings(), metrics)
        runner, port = await _serve_http(HttpShims(registry, metrics, 16, timeout_s=10.0).app(), "127.0.0.1", 0)
        b = Batcher(_lengths, name="best", max_batch_tokens=1000, max_batch_items=16, max_wait_ms=0.0, max_queue=64)
        b.start()
        registry.models["best"] = ServedModel("best", "/m/best", "v1", None, CharEncoder(), b)  # type: ignore[arg-type]
        try:
            body = json.dumps({"model": "\u00e9" * 1_000_000, "query": ["hello"]}).encode()
            status, answer, _ = await _post(port, body, 10.0)
            assert status == 404, answer
            assert answer["error"].startswith("no model named '\u00e9\u00e9")
            assert len(answer["error"]) < 4096
            status, answer, _ = await _post(port, json.dumps({"query": ["hello"]}).encode(), 10.0)
            assert (status, answer["rewards"]) == (200, [5.0])
        finally:
            await runner.cleanup()
            await b.close()
            registry._encode_pool.shutdown(wait=False)

    run(main())


# --- 5. an HTTP request naming an unserved model in its body was counted under the default model ---------------


def test_an_http_request_for_an_unserved_model_is_counted_as_unknown() -> None:
    # The label came from the URL's ?model= only: a body's "model" that no model serves (a client's typo) put
    # its 404 under the default model, whose error rate then rose, where gRPC counts such a name as "unknown".
    async def main() -> None:
        metrics = ScorerMetrics()
        registry = ModelRegistry(ScorerSettings(default_model="best"), metrics)
        runner, port = await _serve_http(HttpShims(registry, metrics, 16, timeout_s=10.0).app(), "127.0.0.1", 0)
        b = Batcher(_lengths, name="best", max_batch_tokens=1000, max_batch_items=16, max_wait_ms=0.0, max_queue=64)
        b.start()
        registry.models["best"] = ServedModel("best", "/m/best", "v1", None, CharEncoder(), b)  # type: ignore[arg-type]
        try:
            assert (await _post(port, json.dumps({"model": "bets", "query": ["hi"]}).encode(), 10.0))[0] == 404
            assert (await _post(port, json.dumps({"model": "best", "query": ["hi"]}).encode(), 10.0))[0] == 200
        finally:
            await runner.cleanup()
            await b.close()
            registry._encode_pool.shutdown(wait=False)
        page = metrics.render().decode()
        assert 'synpref_scorer_requests_total{code="404",method="get_reward",model="unknown"} 1.0' in page
        assert 'code="404",method="get_reward",model="best"' not in page
        assert 'synpref_scorer_requests_total{code="200",method="get_reward",model="best"} 1.0' in page

    run(main())
