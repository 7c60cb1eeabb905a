"""Review findings in the scorer's queue accounting, HTTP shims and client, each reproduced."""

from __future__ import annotations

import asyncio
import threading

import pytest

from synpref.services.scorer.batcher import Batcher
from testing.scorer_fakes import CharEncoder


class Gate:
    """A forward that blocks until opened and records the ids it computed."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.seen: list[list[int]] = []

    def __call__(self, batch: list[list[int]]) -> list[float]:
        self.entered.set()
        assert self.open.wait(5), "test forgot to open the gate"
        self.seen.extend(batch)
        return [float(sum(x)) for x in batch]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def busy_batcher(gate: Gate) -> tuple[Batcher, asyncio.Future]:
    """A started Batcher (max_queue 4) whose first forward, of one item, runs held at `gate`; (it, that request)."""
    b = Batcher(gate, name="m", max_batch_tokens=1000, max_batch_items=16, max_wait_ms=0.0, max_queue=4)
    b.start()
    blocker = asyncio.ensure_future(b.score([[1]]))
    await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 5)
    return b, blocker


def test_cancelled_queued_items_stop_counting_against_max_queue_before_the_forward_ends() -> None:
    # Items of a cancelled request stayed queued (and in depth, the backlog and the metric) until the
    # running forward ended, so under client cancellations an idle-looking scorer refused new work.
    gate = Gate()

    async def main() -> None:
        b, blocker = await busy_batcher(gate)
        late = asyncio.ensure_future(b.score_encoding(lambda: [[3]]))  # waits for the forward's end
        gone = asyncio.ensure_future(b.score([[2], [2], [2]]))
        await asyncio.sleep(0.01)
        gone.cancel()
        late.cancel()
        await asyncio.sleep(0.01)
        assert b.depth == 0 and b._backlog_tokens == 1  # only the computing item is left
        kept = asyncio.ensure_future(b.score([[5], [5], [5]]))  # refused before: 3 + 3 > max_queue
        deferred = asyncio.ensure_future(b.score_encoding(lambda: [[6]]))
        await asyncio.sleep(0.01)
        gate.open.set()
        assert (await kept).rewards == [5.0] * 3 and (await deferred).rewards == [6.0]
        await blocker
        assert [2] not in gate.seen and [3] not in gate.seen
        await b.close()

    run(main())


def test_requests_expired_in_the_queue_stop_counting_against_max_queue() -> None:
    gate = Gate()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        b, blocker = await busy_batcher(gate)
        expiring = asyncio.ensure_future(b.score([[2]] * 4, deadline=loop.time() + 0.05))
        with pytest.raises(Exception, match="deadline"):
            await expiring
        await asyncio.sleep(0)
        kept = asyncio.ensure_future(b.score([[5]] * 4))
        await asyncio.sleep(0.01)
        gate.open.set()
        assert (await kept).rewards == [5.0] * 4
        await blocker
        await b.close()

    run(main())


async def _shims_server(**kw: float):
    """The shims on the scorer's own HTTP runner (aiohttp's TestServer cancels handlers on disconnect; it does not)."""
    from synpref.services.scorer.http import HttpShims
    from synpref.services.scorer.metrics import ScorerMetrics
    from synpref.services.scorer.registry import ModelRegistry
    from synpref.services.scorer.server import _serve_http
    from synpref.shared.config import ScorerSettings

    metrics = ScorerMetrics()
    registry = ModelRegistry(ScorerSettings(max_encode_queue=1), metrics)
    runner, port = await _serve_http(HttpShims(registry, metrics, max_request_items=16, **kw).app(), "127.0.0.1", 0)
    return runner, port, registry


async def _post(
    port: int, body: bytes, content_length: int, path: str = "/get_reward"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {content_length}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


def test_a_client_that_stalls_mid_body_does_not_hold_an_encode_slot_past_its_deadline() -> None:
    # The body was read with no bound while holding one of max_encode_queue slots (shared with gRPC):
    # that many clients stalled mid-upload (crashed, partitioned, slow on purpose) got every later HTTP
    # request and every gRPC request refused (429 / RESOURCE_EXHAUSTED) for good.
    async def main() -> None:
        runner, port, registry = await _shims_server(timeout_s=0.3)
        reader, writer = await _post(port, b'{"query": ["', content_length=1000)
        try:
            await asyncio.sleep(0.1)
            assert registry.encode_queue.pending == 1
            status = await asyncio.wait_for(reader.readline(), 3)  # before: no answer, ever
            assert status.split()[1] == b"504"
            assert registry.encode_queue.pending == 0
            ok_reader, ok_writer = await _post(port, b'{"query": ["x"]}', content_length=16)
            status = await asyncio.wait_for(ok_reader.readline(), 3)
            assert status.split()[1] == b"503"  # past the encode queue: no model is loaded
            ok_writer.close()
            await ok_writer.wait_closed()
        finally:
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.05)  # the server sees both connections closed: its cleanup need not wait
            await runner.cleanup()

    run(main())


def test_a_client_that_disconnects_while_its_request_waits_frees_its_queue_places() -> None:
    # aiohttp keeps running a handler whose client went away: its items stayed queued (counting against
    # max_queue) and were computed for nobody, while OpenRLHF re-posts the same batch after its timeout.
    from synpref.services.scorer.registry import ServedModel

    gate = Gate()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        runner, port, registry = await _shims_server(timeout_s=30.0)
        b = Batcher(gate, name="best", max_batch_tokens=1000, max_batch_items=16, max_wait_ms=0.0, max_queue=8)
        b.start()
        registry.models["best"] = ServedModel("best", "ckpt", "v1", None, CharEncoder(), b)  # type: ignore[arg-type]
        blocker = asyncio.ensure_future(b.score([[1]]))
        await loop.run_in_executor(None, gate.entered.wait, 5)
        _, writer = await _post(port, b'{"query": ["zz"]}', content_length=17)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if b._deferred:
                break
        assert len(b._deferred) == 1  # the request waits for the running forward's end
        writer.close()
        for _ in range(300):  # noticed within about a second
            await asyncio.sleep(0.01)
            if all(future.done() for _, _, future in b._deferred):
                break
        assert all(future.done() for _, _, future in b._deferred)  # the request was dropped
        assert b.depth + len(b._deferred) == 0
        gate.open.set()
        await blocker
        await b.close()
        await runner.cleanup()
        assert [ord("z")] * 2 not in gate.seen

    run(main())


def test_when_one_chunk_of_an_async_call_fails_the_others_are_cancelled() -> None:
    # asyncio.gather left the other chunks running when one failed: the caller got its error while
    # those chunks kept scoring (and retrying on 429/503) in the background until the deadline.
    import grpc

    from synpref.client import AsyncRewardClient

    running: dict[str, asyncio.Future[None]] = {}

    class Stub:
        async def Score(self, request, timeout: float, wait_for_ready: bool):
            text = request.items[0].text
            if text == "bad":
                await asyncio.sleep(0.01)
                raise grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata())
            running[text] = asyncio.get_running_loop().create_future()
            await running[text]  # a slow chunk: answered only when the test says so

    async def main() -> None:
        async with AsyncRewardClient("127.0.0.1:1", chunk_size=1, concurrency=4, timeout=30) as rm:
            rm.stub = Stub()  # type: ignore[assignment]
            with pytest.raises(grpc.aio.AioRpcError):
                await rm.score(["slow-1", "bad", "slow-2"])
            await asyncio.sleep(0.01)
            assert set(running) == {"slow-1", "slow-2"}
            assert all(f.cancelled() for f in running.values())

    run(main())


def test_http_requests_are_counted_under_the_model_their_body_names() -> None:
    # The metrics label came from the URL's ?model= only: every /classify and /get_reward naming its
    # model in the body (verl, OpenRLHF) was counted and timed under the default model.
    import json

    from synpref.services.scorer.registry import ServedModel

    async def main() -> None:
        runner, port, registry = await _shims_server(timeout_s=30.0)
        batchers = []
        for name in ("best", "gold"):
            b = Batcher(Gate(), name=name, max_batch_tokens=1000, max_batch_items=16, max_wait_ms=0.0, max_queue=8)
            b.start()
            batchers.append(b)
            registry.models[name] = ServedModel(name, f"/m/{name}", "v1", None, CharEncoder(), b)  # type: ignore[arg-type]
        batchers[1].forward.open.set()  # type: ignore[attr-defined]
        for path, body in (
            ("/classify", {"model": "gold", "input": "ab"}),
            ("/get_reward", {"model": "gold", "query": ["ab"]}),
        ):
            raw = json.dumps(body).encode()
            reader, writer = await _post(port, raw, content_length=len(raw), path=path)
            assert (await asyncio.wait_for(reader.readline(), 5)).split()[1] == b"200"
            writer.close()
        page = registry.metrics.render().decode()
        assert 'synpref_scorer_requests_total{code="200",method="classify",model="gold"} 1.0' in page
        assert 'synpref_scorer_requests_total{code="200",method="get_reward",model="gold"} 1.0' in page
        assert 'model="best"' not in page.split("synpref_scorer_requests_total")[1].split("# HELP")[0]
        for b in batchers:
            b.forward.open.set()  # type: ignore[attr-defined]
            await b.close()
        await runner.cleanup()

    run(main())
