"""Review 43: publishing a trained RM to the scorers (controller/publish.py) and their reload (scorer/registry.py,
scorer/admin.py). Loopback servers and fake models (a real tiny tokenizer, LengthBackend): no checkpoint loads."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from synpref.services.controller.publish import write_registry
from synpref.services.scorer.admin import AdminApi
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import ModelRegistry
from synpref.services.scorer.server import _serve_http
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.shared.roles import BEST
from testing.scorer_fakes import LengthBackend
from testing.tiny import build_tiny_tokenizer

TOKEN = "review43-admin-token"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


class CountedLoads:
    """A backend factory counting loads per checkpoint path; each load waits for `gate` (closed at first)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.loads: dict[str, int] = {}
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> LengthBackend:
        self.loads[path] = self.loads.get(path, 0) + 1
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return LengthBackend(self.tokenizer)


def _registry(loads: CountedLoads) -> ModelRegistry:
    return ModelRegistry(ScorerSettings(device="cpu", max_wait_ms=0.0), ScorerMetrics(), loads)


async def _post(port: int, route: str, body: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """One admin POST on loopback with the token: (status, JSON answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    head = f"POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n"
    try:
        writer.write(f"{head}Connection: close\r\n\r\n".encode() + data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2] or b"{}")


class Reached:
    """Wraps `registry.reload` to set `second` as its second call starts: a reload goes from its start to its wait
    (for the swap lock, or for the load it joins) without yielding, so once the test runs again it has chosen."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.calls = 0
        self.second = asyncio.Event()
        original = registry.reload

        async def reload(name: str, ref: ModelRef) -> Any:
            self.calls += 1
            if self.calls == 2:
                self.second.set()
            return await original(name, ref)

        registry.reload = reload  # type: ignore[method-assign]


# --- 1. the models file's load and the controller's admin reload of one publish load the checkpoint twice -------


def test_an_admin_reload_joins_the_models_file_load_of_the_same_checkpoint(tokenizer: Any, tmp_path: Path) -> None:
    # The controller writes scorer.models_file, then reloads each name on the admin port, one after the other. While
    # the first name loads (minutes at 8B), the pod's file watcher starts loading the second (registry.reload); the
    # admin reload of that second name then queued a load of the very same checkpoint behind it: twice, every stage.
    (tmp_path / "g2").mkdir()
    (tmp_path / "g2" / "config.json").write_text("{}")
    loads = CountedLoads(tokenizer)

    async def main() -> None:
        registry = _registry(loads)
        runner, port = await _serve_http(AdminApi(registry, TOKEN, str(tmp_path)).app(), "127.0.0.1", 0, cancel=False)
        try:
            reached = Reached(registry)
            watcher = asyncio.ensure_future(registry.reload("gold", ModelRef(path=str(tmp_path / "g2"), version="g2")))
            assert await asyncio.to_thread(loads.entered.wait, 10)
            admin = asyncio.ensure_future(
                _post(port, "/admin/reload", {"model": "gold", "path": "g2", "version": "g2"})
            )
            await asyncio.wait_for(reached.second.wait(), 10)  # the admin call's load is queued, or joined
            loads.gate.set()
            assert (await admin) == (200, {"model": "gold", "version": "g2", "model_id": str(tmp_path / "g2")})
            assert (await watcher).version == "g2"
            assert loads.loads == {str(tmp_path / "g2"): 1}  # before: 2, one after the other
            assert registry.models["gold"].version == "g2" and not registry.loading
        finally:
            loads.gate.set()
            await runner.cleanup()
            await registry.close()

    run(main())


def test_a_second_reload_of_a_checkpoint_being_loaded_joins_that_load(tokenizer: Any) -> None:
    loads = CountedLoads(tokenizer)

    async def main() -> None:
        registry = _registry(loads)
        try:
            ref = ModelRef(path="/m/v2", version="v2")
            first = asyncio.ensure_future(registry.reload("best", ref))
            assert await asyncio.to_thread(loads.entered.wait, 10)
            second = asyncio.ensure_future(registry.reload("best", ref))
            other = asyncio.ensure_future(registry.reload("best", ModelRef(path="/m/v2", version="v2b")))
            await asyncio.sleep(0)
            loads.gate.set()
            a, b, c = await asyncio.gather(first, second, other)
            assert a is b and c.version == "v2b"  # another version label is another load
            assert loads.loads == {"/m/v2": 2}
            assert registry.models["best"] is c
        finally:
            loads.gate.set()
            await registry.close()

    run(main())


def test_a_joined_load_whose_caller_left_is_loaded_for_the_one_still_waiting(tokenizer: Any) -> None:
    # The load's first caller (the file watcher, cancelled as the server stops, or an in-process caller's timeout)
    # takes the load with it; a reload that joined it must not fail for that.
    loads = CountedLoads(tokenizer)

    async def main() -> None:
        registry = _registry(loads)
        try:
            ref = ModelRef(path="/m/v2", version="v2")
            first = asyncio.ensure_future(registry.reload("best", ref))
            assert await asyncio.to_thread(loads.entered.wait, 10)
            second = asyncio.ensure_future(registry.reload("best", ref))
            await asyncio.sleep(0)
            first.cancel()
            loads.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert (await second).version == "v2"
            assert registry.models["best"].version == "v2" and not registry.loading
        finally:
            loads.gate.set()
            await registry.close()

    run(main())


# --- 2. models/best dangles when the workdir's path goes through a symbolic link ---------------------------------


def test_models_best_resolves_when_the_workdir_is_reached_through_a_link(tmp_path: Path) -> None:
    # export_registry records each checkpoint's resolved path; the link's target was made relative to models_dir as
    # given. Through a link of another depth (macOS's /tmp -> /private/tmp, a home or volume linked elsewhere, a
    # relative workdir under such a cwd), the relative target climbed out of the real folder: best dangled, and
    # the run's report tells users to serve models/best.
    real = tmp_path / "a" / "b" / "c"
    (real / "models" / "v3").mkdir(parents=True)
    (real / "models" / "v3" / "config.json").write_text("{}")
    os.symlink(real, tmp_path / "work")
    models_dir = tmp_path / "work" / "models"
    checkpoint = str((models_dir / "v3").resolve())
    write_registry(models_dir, {BEST: {"path": checkpoint, "version": "v3"}}, 128)
    assert (models_dir / "best" / "config.json").is_file()
    assert (models_dir / "best").resolve() == Path(checkpoint)
