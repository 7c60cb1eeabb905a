"""Session 45's review of the scorer's model management and admin surface (area R5): each finding reproduced with
fake models (a real tiny tokenizer) on loopback servers, so no checkpoint is loaded."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from synpref.services.scorer.admin import AdminApi
from synpref.services.scorer.metrics import ScorerMetrics
from synpref.services.scorer.registry import ModelRegistry
from synpref.services.scorer.server import _serve_http
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.shared.scorer_admin import ScorerAdminError, reload_model
from testing.scorer_fakes import char_count_shims

TOKEN = "review45-admin-token"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


# --- 1. a load that fails after building its model kept the model until a full gc pass -------------------------


class Weights:
    """Stands for a model's weights (GBs): only whether it is still alive matters."""


def test_a_load_that_fails_after_building_its_model_frees_the_model_at_once() -> None:
    # load_reward_model raises once the weights are in when a checkpoint has no trained head (a base model given by
    # mistake). The traceback's frames held the model, and the exception sits in reference cycles (the load's
    # future and the reload's frames): only a full gc pass freed it, and each models_file retry added a copy.
    built: list[weakref.ref[Weights]] = []

    def check_head(model: Weights) -> None:
        raise ValueError("not a trained reward model")

    def factory(kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> Any:
        model = Weights()
        built.append(weakref.ref(model))
        check_head(model)
        raise AssertionError("unreachable")

    async def scenario() -> None:
        registry = ModelRegistry(ScorerSettings(device="cpu"), ScorerMetrics(), factory)
        try:
            for _ in range(2):  # as a models_file entry is retried
                with pytest.raises(ValueError, match="not a trained reward model"):
                    await registry.reload("best", ModelRef(path="/models/base"))
                for _ in range(5):  # the futures' done callbacks run
                    await asyncio.sleep(0)
            alive = sum(ref() is not None for ref in built)
            assert alive == 0, f"{alive} of {len(built)} failed loads still hold their model"
        finally:
            await registry.close()

    gc.collect()
    gc.disable()  # what a server sees between full gc passes
    try:
        run(scenario())
    finally:
        gc.enable()


# --- 2. a body whose Content-Encoding does not decode answered 500 ---------------------------------------------


async def _exchange(port: int, head: str, body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_is_not_in_its_content_encoding_is_400_not_500(encoding: str) -> None:
    async def main() -> None:
        runner, port, b = await char_count_shims()
        try:
            head = f"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Encoding: {encoding}\r\n"
            status, raw = await _exchange(port, head, b'{"query": ["a"]}')
            answer = json.loads(raw)
            assert status == 400, answer  # before: 500 "internal error: RequestPayloadError: ..."
            assert answer["code"] == 400 and encoding in answer["error"]
        finally:
            await b.close()
            await runner.cleanup()

    run(main())


def test_an_admin_body_that_is_not_in_its_content_encoding_is_400_not_500(tmp_path: Path) -> None:
    async def main() -> None:
        registry = ModelRegistry(ScorerSettings(device="cpu"), ScorerMetrics())
        runner, port = await _serve_http(AdminApi(registry, TOKEN, str(tmp_path)).app(), "127.0.0.1", 0, cancel=False)
        try:
            head = (
                f"POST /admin/unload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Encoding: gzip\r\n"
            )
            status, raw = await _exchange(port, head, b'{"model": "best"}')
            assert status == 400, raw  # before: aiohttp's 500 page
            assert json.loads(raw)["code"] == 400
        finally:
            await runner.cleanup()
            await registry.close()

    run(main())


# --- 3. an error answer cut off after its status line escaped as a raw exception --------------------------------


def test_an_admin_error_answer_cut_off_mid_body_is_a_scorer_admin_error_with_its_status() -> None:
    # A scorer pod stopping mid-answer (its 503 while draining): the body read inside the HTTPError branch raised
    # IncompleteRead past every handler, so the controller's publish, which asks again on a 503, crashed instead.
    server = socket.create_server(("127.0.0.1", 0))

    def answer_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 200\r\n\r\n{"error": "draini')

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(ScorerAdminError) as caught:
            reload_model(url, "best", "v4", "v4", TOKEN, timeout_s=10)
        assert caught.value.status == 503
    finally:
        thread.join(10)
        server.close()


@pytest.mark.parametrize("role", [["assistant"], {"r": 1}])
def test_an_unhashable_role_is_invalid_input_not_a_type_error(role: object) -> None:
    """Found in review: `role not in ROLES` on a list or dict role raised TypeError (unhashable), a 500 on the HTTP
    shims (POST /classify) rather than the 400 of any other bad role."""
    from synpref.services.scorer.encoding import validate_messages
    from synpref.services.scorer.errors import InvalidInput

    with pytest.raises(InvalidInput, match="has role"):
        validate_messages([{"role": role, "content": "x"}])
