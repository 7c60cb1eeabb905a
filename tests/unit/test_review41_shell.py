"""Session 41's review of the service shells (start, health, shutdown), each finding reproduced on loopback
servers with fake models (a real tiny tokenizer, a forward held at a gate) so no checkpoint is loaded."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from synpref.services.scorer.server import BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from testing.scorer_fakes import LengthBackend
from testing.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


class HeldBackend(LengthBackend):
    """LengthBackend whose forwards wait for `gate` (set `entered` first)."""

    def __init__(self, tokenizer: Any, gate: threading.Event, entered: threading.Event) -> None:
        super().__init__(tokenizer)
        self.gate, self.entered = gate, entered

    def forward(self, batch: list[list[int]]) -> list[float]:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return super().forward(batch)


async def _post_get_reward(port: int) -> bytes:
    """POST /get_reward and read until the server closes the connection (answer or not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"query": ["hold me"]}'
    head = f"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
    await writer.drain()
    try:
        return await reader.read()
    finally:
        writer.close()


# --- 1. the HTTP shims drained for a fixed 30 s, whatever scorer.drain_s (or stop's grace) said ---------------


@pytest.mark.parametrize("drain_s", [0.5, 0.0])
def test_http_requests_in_flight_get_the_drain_grace_not_a_fixed_30_s(tokenizer: Any, drain_s: float) -> None:
    # runner.cleanup() waited up to aiohttp's shutdown_timeout, fixed at 30 s, for an HTTP request in flight:
    # a drain_s above 30 cut OpenRLHF's requests at 30 s, one below it held the pod up to 30 s past its drain
    # while gRPC had long stopped. The HTTP request must end when the grace does; a grace of 0 (drain_s: 0, or
    # main's stop after a failed load) is none, not aiohttp's "no limit".
    gate, entered = threading.Event(), threading.Event()

    def factory(kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> HeldBackend:
        return HeldBackend(tokenizer, gate, entered)

    settings = ScorerSettings(
        port=0, http_port=0, metrics_port=0, drain_s=drain_s, models={"best": ModelRef(path="held")}, max_wait_ms=0.0
    )
    bg = BackgroundScorer(settings, factory).start()
    stopper: threading.Thread | None = None
    try:
        answer = asyncio.run_coroutine_threadsafe(_post_get_reward(bg.server.http_port), bg.loop)
        assert entered.wait(10), "the request never reached the forward"
        t0 = time.monotonic()
        stopper = threading.Thread(target=bg.run, args=(bg.server.stop(),), daemon=True)  # grace: drain_s
        stopper.start()
        try:
            answer.result(8)  # an answer, or the connection dropped: either ends the request
        except TimeoutError:
            pytest.fail(f"the HTTP request was still held 8 s into a {drain_s} s drain")
        except (ConnectionError, OSError):
            pass
        assert time.monotonic() - t0 < 5.0
    finally:
        gate.set()
        if stopper is not None:
            stopper.join(30)
        bg.loop.call_soon_threadsafe(bg.loop.stop)
