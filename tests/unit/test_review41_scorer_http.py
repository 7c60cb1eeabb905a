"""Session 41's review of the scorer's HTTP shims and admin API, each finding reproduced on loopback servers
with fake models (a real tiny tokenizer, LengthBackend) so no checkpoint is loaded."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from synpref.services.scorer.admin import AdminApi
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import ModelRegistry
from synpref.services.scorer.server import _serve_http
from synpref.shared.config import ScorerSettings
from testing.scorer_fakes import LengthBackend, char_count_shims
from testing.tiny import build_tiny_tokenizer

TOKEN = "review41-admin-token"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _exchange(port: int, head: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """Send one raw HTTP/1.1 request (head without the blank line) and read the status and JSON answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2] or b"{}")


# --- 1. a retried admin reload loads the checkpoint again -----------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


class CountedLoads:
    """A backend factory counting loads per checkpoint path; each load waits for `gate` (open by default)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.loads: dict[str, int] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> LengthBackend:
        self.loads[path] = self.loads.get(path, 0) + 1
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return LengthBackend(self.tokenizer)


def _model_root(tmp_path: Path) -> Path:
    for name in ("v1", "v2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    return tmp_path


async def _admin(registry: ModelRegistry, root: Path) -> tuple[web.AppRunner, int]:
    return await _serve_http(AdminApi(registry, TOKEN, str(root)).app(), "127.0.0.1", 0, cancel=False)


def _reload(port: int, body: dict[str, str]) -> Any:
    head = f"POST /admin/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    return _exchange(port, head, json.dumps(body).encode())


def test_a_reload_of_what_is_served_already_answers_without_loading_it_again(tokenizer: Any, tmp_path: Path) -> None:
    # An 8B checkpoint loads for longer than the controller's 120 s admin timeout. The reload goes on when the
    # caller leaves, but the retry (and the resumed controller's serve_models, on every restart) loaded the very
    # checkpoint again, minutes each, and timed out again: the controller never got its answer.
    root = _model_root(tmp_path)
    loads = CountedLoads(tokenizer)

    async def main() -> None:
        registry = ModelRegistry(ScorerSettings(device="cpu", max_wait_ms=0.0), ScorerMetrics(), loads)
        runner, port = await _admin(registry, root)
        try:
            body = {"model": "best", "path": "v1", "version": "v1"}
            assert await _reload(port, body) == (200, {"model": "best", "version": "v1", "model_id": str(root / "v1")})
            assert await _reload(port, body) == (200, {"model": "best", "version": "v1", "model_id": str(root / "v1")})
            assert loads.loads == {str(root / "v1"): 1}  # before: 2
            # Another version label, or another checkpoint, is still a reload.
            assert (await _reload(port, {"model": "best", "path": "v1", "version": "v1b"}))[1]["version"] == "v1b"
            assert (await _reload(port, {"model": "best", "path": "v2"}))[1]["version"] == "v2"
            assert loads.loads == {str(root / "v1"): 2, str(root / "v2"): 1}
        finally:
            await runner.cleanup()
            await registry.close()

    run(main())


class Checked:
    """Wraps admin.checkpoint_under to set `nth[n]` at its n-th call. A reload handler goes from that check to its
    load (or its wait for one) without yielding: once a test awaiting the event runs again, the handler chose."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from synpref.services.scorer import admin

        self.calls = 0
        self.nth = {n: asyncio.Event() for n in (1, 2, 3)}
        self._check = admin.checkpoint_under
        monkeypatch.setattr(admin, "checkpoint_under", self)

    def __call__(self, root: Path, path: str) -> Path:
        self.calls += 1
        if self.calls in self.nth:
            self.nth[self.calls].set()
        return self._check(root, path)


def test_a_repeat_of_a_reload_under_way_waits_for_it_instead_of_loading_again(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _model_root(tmp_path)
    loads = CountedLoads(tokenizer)
    loads.gate.clear()

    async def main() -> None:
        checked = Checked(monkeypatch)  # its events belong to this loop
        registry = ModelRegistry(ScorerSettings(device="cpu", max_wait_ms=0.0), ScorerMetrics(), loads)
        runner, port = await _admin(registry, root)
        try:
            body = {"model": "best", "path": "v2", "version": "v2"}
            first = asyncio.ensure_future(_reload(port, body))
            assert await asyncio.to_thread(loads.entered.wait, 10)
            retry = asyncio.ensure_future(_reload(port, body))  # the caller gave up and asks again
            await asyncio.wait_for(checked.nth[2].wait(), 10)
            loads.gate.set()
            assert (await first)[0] == 200 and (await retry)[0] == 200
            assert loads.loads == {str(root / "v2"): 1}  # before: 2, one after the other
            assert registry.models["best"].version == "v2"
        finally:
            loads.gate.set()
            await runner.cleanup()
            await registry.close()

    run(main())


def test_a_reload_queued_behind_another_version_is_not_answered_early(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # v1 is served and v2 is loading: a reload back to v1 (a rollback) must wait and serve v1 after v2, not answer
    # "v1 is served" at once and leave v2 serving.
    root = _model_root(tmp_path)
    loads = CountedLoads(tokenizer)

    async def main() -> None:
        checked = Checked(monkeypatch)
        registry = ModelRegistry(ScorerSettings(device="cpu", max_wait_ms=0.0), ScorerMetrics(), loads)
        runner, port = await _admin(registry, root)
        try:
            assert (await _reload(port, {"model": "best", "path": "v1"}))[0] == 200
            loads.gate.clear()
            loads.entered.clear()
            forward = asyncio.ensure_future(_reload(port, {"model": "best", "path": "v2"}))
            assert await asyncio.to_thread(loads.entered.wait, 10)
            back = asyncio.ensure_future(_reload(port, {"model": "best", "path": "v1"}))
            await asyncio.wait_for(checked.nth[3].wait(), 10)
            assert registry.loading["best"] == 2  # the rollback is queued behind v2's load
            loads.gate.set()
            assert (await forward)[0] == 200 and (await back)[0] == 200
            assert registry.models["best"].version == "v1"
        finally:
            loads.gate.set()
            await runner.cleanup()
            await registry.close()

    run(main())


# --- 2. with http_timeout_s 0 a stalled upload holds its encode slot for good ---------------------------------


def test_a_stalled_upload_frees_its_encode_slot_without_a_request_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The body was read by the request's deadline, and with http_timeout_s: 0 (documented: no deadline) there is
    # none: max_encode_queue clients stalled mid-upload got every HTTP and gRPC request refused (429) for good.
    from synpref.services.scorer import http
    from synpref.services.scorer.http import HttpShims

    monkeypatch.setattr(http, "BODY_TIMEOUT_S", 0.3, raising=False)

    async def main() -> None:
        metrics = ScorerMetrics()
        registry = ModelRegistry(ScorerSettings(max_encode_queue=1), metrics)
        runner, port = await _serve_http(HttpShims(registry, metrics, 16, timeout_s=0.0).app(), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b'POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"query": ["')
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 5)  # before: no answer, the slot held for good
            assert status.split()[1] == b"504"
            assert registry.encode_queue.pending == 0
            assert (await _exchange(port, "POST /get_reward HTTP/1.1\r\nHost: x\r\n", b'{"query": ["x"]}'))[0] == 503
        finally:
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.05)
            await runner.cleanup()

    run(main())


# --- 3. vLLM's activation fields: the first one set decides ---------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"use_activation": None, "activation": True},  # a client that sends every field of vLLM's request
        {"softmax": True},  # vLLM's older name, still honoured by vLLM
        {"activation": True, "use_activation": False},  # vLLM: activation first
    ],
)
def test_classify_applies_the_activation_vllm_would(fields: dict[str, Any]) -> None:
    # `use_activation` present but null hid `activation: true`, and `softmax` was ignored: such clients got raw
    # logits where they asked for (and vLLM gives) probabilities.
    from synpref.shared.pairs import sigmoid

    async def main() -> None:
        runner, port, b = await char_count_shims()
        try:
            body = json.dumps({"input": "abc", **fields}).encode()
            status, answer = await _exchange(port, "POST /classify HTTP/1.1\r\nHost: x\r\n", body)
            assert status == 200, answer
            assert answer["data"][0]["probs"] == [sigmoid(3.0)]  # before: [3.0]
        finally:
            await b.close()
            await runner.cleanup()

    run(main())


def test_classify_without_an_activation_field_stays_raw() -> None:
    async def main() -> None:
        runner, port, b = await char_count_shims()
        try:
            for fields in ({}, {"use_activation": None, "activation": None}, {"activation": False, "softmax": None}):
                body = json.dumps({"input": "abc", **fields}).encode()
                status, answer = await _exchange(port, "POST /classify HTTP/1.1\r\nHost: x\r\n", body)
                assert (status, answer["data"][0]["probs"]) == (200, [3.0])
            status, answer = await _exchange(
                port, "POST /classify HTTP/1.1\r\nHost: x\r\n", b'{"input": "abc", "softmax": "yes"}'
            )
            assert status == 400 and "softmax" in answer["error"]
        finally:
            await b.close()
            await runner.cleanup()

    run(main())


# --- 4. malformed requests answered 500 (with a traceback logged each) ----------------------------------------


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ("", b'{"query": ["a"], "n": ' + b"1" * 5000 + b"}"),  # past Python's int digit limit: ValueError
        ("Content-Type: application/json; charset=no-such-codec\r\n", b'{"query": ["a"]}'),  # LookupError
    ],
)
def test_malformed_bodies_are_400_not_500(headers: str, body: bytes) -> None:
    async def main() -> None:
        runner, port, b = await char_count_shims()
        try:
            status, answer = await _exchange(port, f"POST /get_reward HTTP/1.1\r\nHost: x\r\n{headers}", body)
            assert status == 400, answer  # before: 500 "internal error: ..."
            assert answer["code"] == 400 and "internal error" not in answer["error"]
        finally:
            await b.close()
            await runner.cleanup()

    run(main())


def test_an_admin_token_that_is_not_utf8_is_401_not_500(tokenizer: Any, tmp_path: Path) -> None:
    async def main() -> None:
        registry = ModelRegistry(ScorerSettings(device="cpu"), ScorerMetrics(), CountedLoads(tokenizer))
        runner, port = await _admin(registry, _model_root(tmp_path))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b'{"model": "best"}'
            head = b"POST /admin/unload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
            writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.split()[1] == b"401"  # before: 500 (UnicodeEncodeError in the token check)
            writer.close()
            await writer.wait_closed()
        finally:
            await runner.cleanup()
            await registry.close()

    run(main())
