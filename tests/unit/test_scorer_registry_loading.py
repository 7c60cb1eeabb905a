"""ModelRegistry.loading counts the loads of a name under way: a name reads "loading" (NotReady, retry)
until the last of them ends, not "no model" once the first one ends.

Fake backends whose load waits for a gate per checkpoint path, around a real tiny tokenizer."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from synpref.services.scorer.errors import NoModel, NotReady
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import ModelRegistry
from synpref.shared.config import ModelRef, ScorerSettings
from testing.scorer_fakes import LengthBackend
from testing.tiny import build_tiny_tokenizer

BROKEN = "/m/broken"
"""The checkpoint path whose load fails (once its gate opens)."""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


class GatedLoads:
    """A backend factory whose load of each path signals `entered[path]`, then waits for `gates[path]`."""

    def __init__(self, tokenizer: Any, paths: list[str]) -> None:
        self.tokenizer = tokenizer
        self.entered = {path: threading.Event() for path in paths}
        self.gates = {path: threading.Event() for path in paths}

    def __call__(self, kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> LengthBackend:
        self.entered[path].set()
        assert self.gates[path].wait(10), f"the test never opened the gate of {path}"
        if path == BROKEN:
            raise OSError(f"{path} is not a checkpoint")
        return LengthBackend(self.tokenizer)

    def open_all(self) -> None:
        for gate in self.gates.values():
            gate.set()


def test_a_name_stays_loading_until_the_last_of_two_racing_reloads_ends(tokenizer: Any) -> None:
    """The first reload fails while a second of the same name waits for the swap lock: the name must
    still read NotReady (it is coming), not NoModel. It used to share one set entry, which the first
    reload's end removed."""
    loads = GatedLoads(tokenizer, [BROKEN, "/m/v2"])

    async def scenario() -> None:
        registry = ModelRegistry(ScorerSettings(device="cpu", max_wait_ms=0.0), ScorerMetrics(), loads)
        try:
            first = asyncio.ensure_future(registry.reload("best", ModelRef(path=BROKEN)))
            assert await asyncio.to_thread(loads.entered[BROKEN].wait, 10)
            second = asyncio.ensure_future(registry.reload("best", ModelRef(path="/m/v2")))
            await asyncio.sleep(0)  # one step of `second`: it counts itself loading, then waits for the swap lock
            assert not second.done() and "best" in registry.loading

            loads.gates[BROKEN].set()
            with pytest.raises(OSError, match="not a checkpoint"):
                await first
            assert await asyncio.to_thread(loads.entered["/m/v2"].wait, 10)
            for name in ("best", ""):
                with pytest.raises(NotReady, match="loading"):
                    registry.get(name)
            assert registry.loading == {"best": 1}

            loads.gates["/m/v2"].set()
            assert (await second).model_id == "/m/v2"
            assert registry.get("best").model_id == "/m/v2" and not registry.loading
        finally:
            loads.open_all()
            await registry.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_begin_and_end_loading_count(tokenizer: Any) -> None:
    """The server marks configured names loading at start-up on top of the reloads' own marks."""

    async def scenario() -> None:
        registry = ModelRegistry(ScorerSettings(device="cpu"), ScorerMetrics(), GatedLoads(tokenizer, []))
        registry.begin_loading("best")
        registry.begin_loading("best")
        registry.end_loading("best")
        with pytest.raises(NotReady):
            registry.get("best")
        registry.end_loading("best")
        assert not registry.loading
        with pytest.raises(NoModel):
            registry.get("best")
        registry.end_loading("best")  # one too many is harmless
        assert not registry.loading
        await registry.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
