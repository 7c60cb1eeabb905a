"""A scorer backend for tests that need the registry or the server, not a model."""

from __future__ import annotations

from typing import Any


class LengthBackend:
    """A loaded "model" whose reward for an item is its token count."""

    kind = "torch"
    dtype = "float32"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def forward(self, batch: list[list[int]]) -> list[float]:
        return [float(len(ids)) for ids in batch]

    def close(self) -> None:
        pass


class CharEncoder:
    """The little of an Encoder the HTTP /get_reward path uses: each text's ids are its characters' codes."""

    def strip_padding(self, text: str) -> str:
        return text

    def text(self, text: str, what: str) -> list[int]:
        return [ord(c) for c in text]


async def char_count_shims(settings: Any = None) -> tuple[Any, int, Any]:
    """The scorer's HTTP shims on its own HTTP runner (loopback, a free port), serving "best" whose rewards are the
    texts' character counts: (the aiohttp runner, its port, the started Batcher). Stop both when done."""
    from synpref.services.scorer.batcher import Batcher
    from synpref.services.scorer.http import HttpShims
    from synpref.services.scorer.metrics import ScorerMetrics
    from synpref.services.scorer.registry import ModelRegistry, ServedModel
    from synpref.services.scorer.server import _serve_http
    from synpref.shared.config import ScorerSettings

    metrics = ScorerMetrics()
    registry = ModelRegistry(settings or ScorerSettings(), metrics)
    runner, port = await _serve_http(HttpShims(registry, metrics, 16, timeout_s=10.0).app(), "127.0.0.1", 0)
    b = Batcher(lambda ids: [float(len(x)) for x in ids], name="best", max_batch_tokens=1000, max_batch_items=16,
                max_wait_ms=0.0, max_queue=64)  # fmt: skip
    b.start()
    registry.models["best"] = ServedModel("best", "/m/best", "v1", None, CharEncoder(), b)  # type: ignore[arg-type]
    return runner, port, b
