"""Session 44's fixes to the scorer's model reload: a hung checkpoint load no longer holds the swap lock for ever,
an operator's admin rollback is not loaded over by the models_file watcher's retry of a failed entry, and a 503
while no model is served asks for a retry in 10 s, not every second.

Fake backends (LengthBackend around a real tiny tokenizer) on loopback servers: no checkpoint is loaded."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from synpref.services.scorer.batcher import Batcher
from synpref.services.scorer.errors import DeadlineExceeded
from synpref.services.scorer.http import HttpShims
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import ModelRegistry, ServedModel
from synpref.services.scorer.server import ScorerServer, _serve_http
from synpref.shared.config import ModelRef, ScorerSettings
from testing.scorer_fakes import CharEncoder, LengthBackend
from testing.tiny import build_tiny_tokenizer

TOKEN = "fix44-admin-token"
HUNG = "/m/hung"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


class ClosedBackend(LengthBackend):
    """A LengthBackend that says when it is closed (its weights freed)."""

    def __init__(self, tokenizer: Any, path: str, closed: dict[str, threading.Event]) -> None:
        super().__init__(tokenizer)
        self.path = path
        self.closed = closed

    def close(self) -> None:
        self.closed.setdefault(self.path, threading.Event()).set()


class Loads:
    """A backend factory: a load of HUNG blocks until `release` (a stalled filesystem read); a load of a path
    ending in one of `broken` fails; every other path loads at once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.entered = threading.Event()
        self.release = threading.Event()
        self.broken: set[str] = set()
        self.closed: dict[str, threading.Event] = {}
        self.loaded: list[str] = []

    def __call__(self, kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> Any:
        if path == HUNG:
            self.entered.set()
            assert self.release.wait(30), "the test never released the hung load"
        if Path(path).name in self.broken:
            raise OSError(f"{path} is half copied")
        self.loaded.append(path)
        self.closed.setdefault(path, threading.Event())
        return ClosedBackend(self.tokenizer, path, self.closed)


# --- 1. a hung load holds the swap lock for ever --------------------------------------------------------------


def test_a_hung_load_fails_after_the_bound_frees_the_lock_and_its_late_model_is_freed_not_served(
    tokenizer: Any,
) -> None:
    """The first reload's load never ends (until the test releases it): it must fail with DeadlineExceeded after
    scorer.load_timeout_s, the reload queued behind it must then load and serve, and the hung load's model, when it
    finally arrives, must be freed and never swapped in over the newer one."""
    loads = Loads(tokenizer)

    async def scenario() -> None:
        settings = ScorerSettings(device="cpu", max_wait_ms=0.0, load_timeout_s=0.5)
        registry = ModelRegistry(settings, ScorerMetrics(), loads)
        try:
            hung = asyncio.ensure_future(registry.reload("best", ModelRef(path=HUNG)))
            assert await asyncio.to_thread(loads.entered.wait, 10)
            later = asyncio.ensure_future(registry.reload("best", ModelRef(path="/m/v2")))
            with pytest.raises(DeadlineExceeded, match=r"took over 0\.5 s \(scorer\.load_timeout_s"):
                await asyncio.wait_for(asyncio.shield(hung), 5)  # old code: waits for ever (TimeoutError here)
            served = await asyncio.wait_for(later, 5)
            assert served.model_id == "/m/v2" and registry.get("best") is served

            freed = loads.closed.setdefault(HUNG, threading.Event())
            loads.release.set()  # the stalled read ends after all
            assert await asyncio.to_thread(freed.wait, 10), "the late model was not freed"
            assert registry.get("best") is served and not loads.closed["/m/v2"].is_set()
        finally:
            loads.release.set()
            await registry.close()

    run(scenario())


# --- 2. the models_file watcher's retry loads over an operator's admin rollback ---------------------------------


def _checkpoints(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")


async def _admin_reload(port: int, model: str, path: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/admin/reload",
            json={"model": model, "path": path, "version": path},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp,
    ):
        return resp.status, await resp.json()


def test_an_admin_rollback_wins_over_a_failed_models_file_entry_until_the_file_changes(
    tokenizer: Any, tmp_path: Path
) -> None:
    """The file moves best from v4 to v5, whose load fails (half copied); the operator rolls back to v3 on the admin
    port. When v5's copy completes, the watcher's retry must not load it over v3: the operator's choice stands
    until the file changes again, and then the file wins."""
    root = tmp_path / "models"
    root.mkdir()
    _checkpoints(root, "v3", "v4", "v5", "v6")
    (tmp_path / "token").write_text(TOKEN)
    models_file = root / "scorer-models.json"
    models_file.write_text(json.dumps({"best": {"path": "v4", "version": "v4"}}))
    settings = ScorerSettings(
        host="127.0.0.1", port=0, http_port=0, metrics_port=0, admin_port=0, device="cpu", max_wait_ms=0.0,
        admin_enabled=True, admin_token_file=str(tmp_path / "token"), model_root=str(root),
        models_file=str(models_file), models_file_poll_s=3600.0, shutdown_delay_s=0.0,
    )  # fmt: skip
    loads = Loads(tokenizer)

    def served() -> str:
        return server.registry.get("best").version

    server = ScorerServer(settings, loads)

    async def scenario() -> None:
        await server.start()  # loads the file's v4
        watcher = server.models_file
        assert watcher is not None
        try:
            assert served() == "v4"
            loads.broken.add("v5")
            models_file.write_text(json.dumps({"best": {"path": "v5", "version": "v5"}}))
            await watcher.sync()
            assert served() == "v4" and "best" in watcher.wanted  # v5 failed: waiting for a retry

            status, answer = await _admin_reload(server.admin_port, "best", "v3")
            assert status == 200 and answer["version"] == "v3", answer
            loads.broken.clear()  # v5's copy completes
            watcher._retry_at.clear()  # and its retry is due
            await watcher.sync()
            assert served() == "v3", "the watcher's retry loaded the file's v5 over the operator's rollback"
            assert str(root / "v5") not in loads.loaded

            models_file.write_text(json.dumps({"best": {"path": "v6", "version": "v6"}}))
            await watcher.sync()
            assert served() == "v6"  # a new file wins again
        finally:
            await server.stop(grace=1.0, delay=0.0)

    run(scenario())


# --- 3. Retry-After: 1 while no model is served ----------------------------------------------------------------


async def _get_reward(port: int, body: dict[str, Any]) -> tuple[int, str | None]:
    async with aiohttp.ClientSession() as session, session.post(f"http://127.0.0.1:{port}/get_reward", json=body) as r:
        return r.status, r.headers.get("Retry-After")


def test_a_503_while_no_model_is_served_asks_for_a_retry_in_10_s_and_others_in_1() -> None:
    """No model (none loading) and a first load under way both last minutes: Retry-After 10. A 503 while a model
    is served (a name still loading) passes sooner: Retry-After 1 as before."""

    async def scenario() -> None:
        metrics = ScorerMetrics()
        registry = ModelRegistry(ScorerSettings(), metrics)
        runner, port = await _serve_http(HttpShims(registry, metrics, 16, timeout_s=10.0).app(), "127.0.0.1", 0)
        batcher = Batcher(
            lambda ids: [float(len(x)) for x in ids], name="best", max_batch_tokens=1000, max_batch_items=16,
            max_wait_ms=0.0, max_queue=64,
        )  # fmt: skip
        try:
            assert await _get_reward(port, {"query": ["a"]}) == (503, "10")  # NoModel
            registry.begin_loading("best")
            assert await _get_reward(port, {"query": ["a"]}) == (503, "10")  # NotReady: the first load

            batcher.start()
            registry.models["best"] = ServedModel("best", "/m/best", "v1", None, CharEncoder(), batcher)  # type: ignore[arg-type]
            registry.begin_loading("canary")
            assert await _get_reward(port, {"query": ["a"], "model": "canary"}) == (503, "1")  # NotReady: canary
            assert await _get_reward(port, {"query": ["ab"]}) == (200, None)
        finally:
            await runner.cleanup()
            registry.models.clear()
            await batcher.close()
            await registry.close()

    run(scenario())
