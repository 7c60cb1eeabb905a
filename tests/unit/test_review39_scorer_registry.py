"""Review 39, area H: the scorer's model registry, backends, reloads and admin API.

Fake backends (a gate holds each forward) around a real tiny tokenizer, and real tiny checkpoints
where the torch backend itself is under test."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from synpref.services.scorer.admin import checkpoint_under
from synpref.services.scorer.backends import TorchBackend, make_backend
from synpref.services.scorer.encoding import Encoder
from synpref.services.scorer.errors import InvalidInput
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import ModelRegistry
from synpref.shared import modeling
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.shared.scorer_admin import write_models_file
from testing.tiny import build_tiny_reward_model, build_tiny_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


class FakeBackend:
    """A loaded model whose forwards wait for `gate`; records whether it was closed."""

    kind = "torch"
    dtype = "float32"

    def __init__(self, path: str, tokenizer: Any) -> None:
        self.path = path
        self.tokenizer = tokenizer
        self.gate = threading.Event()
        self.closed = False

    def forward(self, batch: list[list[int]]) -> list[float]:
        assert self.gate.wait(10), "test forgot to open the gate"
        return [float(len(ids)) for ids in batch]

    def close(self) -> None:
        self.closed = True


def registry_of(tokenizer: Any, made: list[FakeBackend]) -> ModelRegistry:
    def factory(kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> FakeBackend:
        backend = FakeBackend(path, tokenizer)
        made.append(backend)
        return backend

    return ModelRegistry(ScorerSettings(device="cpu", max_wait_ms=0.0), ScorerMetrics(), factory)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_reload_cancelled_during_the_old_versions_drain_still_finishes_its_requests_and_frees_it(
    tokenizer: Any,
) -> None:
    """An admin client that times out (the controller waits 120 s; loading a big model takes about that)
    has its handler cancelled (handler_cancellation). Landing in the old version's drain, the cancel used
    to cancel the old batcher's worker: the requests queued on it never answered, its model was never freed."""
    made: list[FakeBackend] = []

    async def scenario() -> None:
        registry = registry_of(tokenizer, made)
        old = await registry.reload("best", ModelRef(path="/m/v1"))
        computing = asyncio.ensure_future(old.batcher.score([[1, 2, 3]]))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(old.batcher.score([[4, 5]]))
        await asyncio.sleep(0.05)
        reload = asyncio.ensure_future(registry.reload("best", ModelRef(path="/m/v2")))
        for _ in range(100):  # until the swap: the old version now drains
            await asyncio.sleep(0.01)
            if registry.models["best"] is not old:
                break
        assert registry.models["best"].model_id == "/m/v2"
        reload.cancel()  # the admin client went away
        await asyncio.sleep(0.05)
        made[0].gate.set()
        assert (await asyncio.wait_for(computing, 5)).rewards == [3.0]
        assert (await asyncio.wait_for(queued, 5)).rewards == [2.0]
        for _ in range(100):
            if made[0].closed:
                break
            await asyncio.sleep(0.01)
        assert made[0].closed, "the replaced version's model was never freed"
        made[1].gate.set()
        await registry.close()

    run(scenario())


def test_an_unload_cancelled_during_the_drain_still_finishes_its_requests(tokenizer: Any) -> None:
    made: list[FakeBackend] = []

    async def scenario() -> None:
        registry = registry_of(tokenizer, made)
        model = await registry.reload("canary", ModelRef(path="/m/c1"))
        computing = asyncio.ensure_future(model.batcher.score([[1, 2, 3]]))
        await asyncio.sleep(0.05)
        unload = asyncio.ensure_future(registry.unload("canary"))
        await asyncio.sleep(0.05)
        unload.cancel()
        await asyncio.sleep(0.05)
        made[0].gate.set()
        assert (await asyncio.wait_for(computing, 5)).rewards == [3.0]
        await registry.close()  # waits for the drain it shielded
        assert made[0].closed

    run(scenario())


def test_a_load_that_fails_after_the_weights_loaded_frees_them_and_keeps_the_old_version(tokenizer: Any) -> None:
    made: list[FakeBackend] = []

    class Unhashable:
        """A tokenizer the encoder accepts but whose definition cannot be read (hashing it fails)."""

        pad_token = None
        chat_template = None

        def __len__(self) -> int:
            return 10

        @property
        def backend_tokenizer(self) -> Any:
            raise RuntimeError("broken tokenizer.json")

    async def scenario() -> None:
        registry = registry_of(tokenizer, made)
        await registry.reload("best", ModelRef(path="/m/v1"))
        good = registry.backend_factory
        registry.backend_factory = lambda *args: FakeBackend("/m/v2", Unhashable())  # type: ignore[assignment]
        with pytest.raises(RuntimeError, match="broken tokenizer"):
            await registry.reload("best", ModelRef(path="/m/v2"))
        registry.backend_factory = good
        assert registry.models["best"].model_id == "/m/v1"  # the old version still serves
        made[0].gate.set()
        await registry.close()

    failed: list[FakeBackend] = []
    original_close = FakeBackend.close

    def tracking_close(self: FakeBackend) -> None:
        failed.append(self)
        original_close(self)

    FakeBackend.close = tracking_close  # type: ignore[method-assign]
    try:
        run(scenario())
    finally:
        FakeBackend.close = original_close  # type: ignore[method-assign]
    assert any(b.path == "/m/v2" for b in failed), "the failed load's weights were never freed"


def test_closing_the_torch_backend_releases_the_weights_while_it_is_still_referenced(tmp_path: Path) -> None:
    """close() deleted self.model, but self._run is the same model (or its compiled wrapper): the weights
    lived on as long as anything held the backend, and on CUDA empty_cache() ran while they did."""
    path = build_tiny_reward_model(tmp_path / "m", arch="qwen3")
    backend = TorchBackend(str(path), "cpu", "float32")
    weights = weakref.ref(backend.model)
    backend.close()
    assert weights() is None, "the closed backend still holds its model"


def test_an_admin_path_with_a_nul_byte_is_refused_like_any_other_bad_path(tmp_path: Path) -> None:
    """It raised ValueError (embedded null byte) past the admin guard: 500 instead of the usual 400."""
    with pytest.raises(InvalidInput, match=r"under scorer\.model_root"):
        checkpoint_under(tmp_path.resolve(), "v1\x00/../x")


def test_writing_the_models_file_keeps_the_names_of_a_yaml_file(tmp_path: Path) -> None:
    """Scorers read the models file as JSON or YAML (an operator edits it to roll back); the controller read
    it as JSON alone, so its next write dropped every other name of a YAML file."""
    path = tmp_path / "scorer-models.yaml"
    path.write_text("canary:\n  path: /models/c7\n  version: c7\nbest:\n  path: /models/v3\n  version: v3\n")
    listed = write_models_file(path, {"best": {"path": "/models/v4", "version": "v4"}})
    assert listed == {
        "best": {"path": "/models/v4", "version": "v4"},
        "canary": {"path": "/models/c7", "version": "c7"},
    }
    assert json.loads(path.read_text()) == listed


def test_a_models_file_that_parses_as_nothing_is_replaced_by_the_new_entries(tmp_path: Path) -> None:
    path = tmp_path / "scorer-models.json"
    path.write_text('{"best": {"path": ')
    assert write_models_file(path, {"best": {"path": "/m/v4"}}) == {"best": {"path": "/m/v4", "version": ""}}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
@pytest.mark.parametrize("device", ["cuda:1", "cpu"])
def test_the_vllm_backend_refuses_a_device_it_would_silently_ignore(device: str) -> None:
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        make_backend("vllm", "x", device, "bfloat16", 128)


def test_reject_cuts_a_huge_message_before_tokenizing_it(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With on_too_long=reject, shared.modeling skipped the character cut: a 4 MB message was tokenized whole
    (seconds of CPU, per request) only to be rejected. Now the tokenizer sees at most the budget."""
    seen: list[int] = []
    real = modeling.tokenize_rendered

    def spy(tok: Any, text: str, from_template: bool) -> list[int]:
        seen.append(len(text))
        return real(tok, text, from_template)

    monkeypatch.setattr(modeling, "tokenize_rendered", spy)
    encoder = Encoder(tokenizer, 64, "reject")
    huge = "hello world " * 400_000
    short = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidInput, match="longer than max_length"):
        encoder.conversation([*short, {"role": "assistant", "content": huge}])
    with pytest.raises(InvalidInput, match="longer than max_length"):
        encoder.pair(short, [{"role": "assistant", "content": huge}], [{"role": "assistant", "content": "ok"}], "p")
    assert seen and max(seen) < encoder.char_budget + 200, f"tokenized {max(seen)} characters"
    # Under the budget nothing changes: the same ids as the truncating encoder's for a fitting item.
    item = [*short, {"role": "assistant", "content": "hello"}]
    assert encoder.conversation(item) == Encoder(tokenizer, 64, "truncate").conversation(item)
