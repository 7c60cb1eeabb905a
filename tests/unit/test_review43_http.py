"""Session 43's review of the scorer's HTTP endpoint (services/scorer/http.py): each finding reproduced with the
shims on a loopback aiohttp server and a fake model (a batcher whose rewards come from the texts), so no
checkpoint is loaded."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import math
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from synpref.services.scorer.batcher import Batcher
from synpref.services.scorer.http import HttpShims
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import INLINE_ENCODE_BYTES, ModelRegistry, ServedModel
from synpref.services.scorer.server import _serve_http
from synpref.shared.config import ScorerSettings
from testing.scorer_fakes import CharEncoder


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


class ThreadNotingEncoder(CharEncoder):
    """CharEncoder that notes the thread each text is tokenized on."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def text(self, text: str, what: str) -> list[int]:
        self.threads.append(threading.current_thread())
        return super().text(text, what)


@contextlib.asynccontextmanager
async def _serving(
    forward: Callable[[list[list[int]]], list[float]], encoder: CharEncoder | None = None
) -> AsyncIterator[int]:
    """The HTTP shims on loopback serving "best" (ids: the texts' character codes; rewards: `forward`'s); the port."""
    metrics = ScorerMetrics()
    registry = ModelRegistry(ScorerSettings(), metrics)
    runner, port = await _serve_http(HttpShims(registry, metrics, 16, timeout_s=10.0).app(), "127.0.0.1", 0)
    b = Batcher(forward, name="best", max_batch_tokens=10**6, max_batch_items=16, max_wait_ms=0.0, max_queue=64)
    b.start()
    model = ServedModel("best", "/m/best", "v1", None, encoder or CharEncoder(), b)  # type: ignore[arg-type]
    registry.models["best"] = model
    try:
        yield port
    finally:
        await runner.cleanup()
        await b.close()
        registry._encode_pool.shutdown(wait=False)


async def _post(port: int, path: str, body: bytes, headers: str = "") -> tuple[int, bytes]:
    """One HTTP/1.1 POST on a new connection: the status and the raw body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _strict(payload: bytes) -> Any:
    """JSON as a strict parser (Go's encoding/json, JavaScript's JSON.parse) reads it: no NaN or Infinity."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(payload, parse_constant=refuse)


# --- 1. a model's NaN or infinite reward made the whole answer invalid JSON --------------------------------------


def _broken_model(batch: list[list[int]]) -> list[float]:
    """Rewards of a model that outputs NaN for texts starting "n", +inf for "i", -inf for "m"; else the length."""
    special = {ord("n"): math.nan, ord("i"): math.inf, ord("m"): -math.inf}
    return [special.get(ids[0], float(len(ids))) for ids in batch]


def test_non_finite_rewards_are_null_so_the_answer_is_json_and_the_other_rewards_parse() -> None:
    # json.dumps wrote bare NaN / Infinity: not JSON, so a strict client (Go, JavaScript, a parse_constant hook)
    # lost every reward of the request to one bad item, and Python clients got a NaN reward to train on unseen.
    async def main() -> None:
        async with _serving(_broken_model) as port:
            status, raw = await _post(port, "/get_reward", b'{"query": ["abc", "nan", "inf", "minus", "ab"]}')
            assert status == 200
            answer = _strict(raw)  # before: ValueError: NaN is not JSON
            assert answer["rewards"] == answer["scores"] == [3.0, None, None, None, 2.0]
            for fields in ({}, {"activation": True}):
                body = json.dumps({"input": ["nan", "abcd", "inf"], **fields}).encode()
                status, raw = await _post(port, "/classify", body)
                assert status == 200
                probs = [d["probs"] for d in _strict(raw)["data"]]
                # sigmoid(inf) is 1.0, a probability; sigmoid(NaN) stays NaN
                assert probs == ([[None], [4.0], [None]] if not fields else [[None], [1 / (1 + math.exp(-4))], [1.0]])

    run(main())


# --- 2. a gzip body a few KiB on the wire was tokenized on the event loop, whatever its decompressed size --------


def test_a_compressed_body_large_once_decompressed_is_tokenized_off_the_event_loop() -> None:
    # aiohttp decompresses a Content-Encoding: gzip body (up to max_body_bytes), but the inline-tokenizing choice
    # read Content-Length, the compressed size: 16 KiB of gzip holds megabytes of text, all tokenized on the event
    # loop, stalling every other HTTP and gRPC caller of the scorer meanwhile.
    async def main() -> None:
        encoder = ThreadNotingEncoder()
        async with _serving(lambda batch: [float(len(ids)) for ids in batch], encoder) as port:
            text = "a" * (40 * INLINE_ENCODE_BYTES)
            body = gzip.compress(json.dumps({"query": [text]}).encode())
            assert len(body) < INLINE_ENCODE_BYTES
            status, raw = await _post(port, "/get_reward", body, "Content-Encoding: gzip\r\n")
            assert (status, _strict(raw)["rewards"]) == (200, [float(len(text))])
            assert encoder.threads[-1] is not threading.main_thread()  # before: the event loop's thread
            # A small plain body is still tokenized inline, where a thread hand-off would cost more than it saves.
            status, raw = await _post(port, "/get_reward", b'{"query": ["abc"]}')
            assert (status, _strict(raw)["rewards"]) == (200, [3.0])
            assert encoder.threads[-1] is threading.main_thread()

    run(main())
