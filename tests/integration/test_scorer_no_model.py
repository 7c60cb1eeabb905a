"""Issue 13, defect 5: the scorer starts and is Ready before any model exists.

On a fresh install the models come later (the controller trains them and reloads the scorer,
or someone copies a checkpoint onto the volume). So a scorer with no model, or with a
configured checkpoint that is not there yet, stays up: health "" SERVING (the readiness probe),
synpref.v1.RewardService NOT_SERVING until a model is served, scoring calls failing fast with a
message saying how models arrive. Real servers on loopback, tiny checkpoints built on the spot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from synpref.services.scorer.server import SERVICE_NAME, BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.v1 import reward_pb2, reward_pb2_grpc
from testing.tiny import build_tiny_reward_model
from testing.wait import wait_until

pytestmark = pytest.mark.integration
torch.set_num_threads(1)
TOKEN = "admin-token-for-no-model-tests"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NO_MODEL_WORDS = "no model is loaded"


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health(address: str) -> dict[str, int]:
    """Health of "" and of the RewardService, as a client sees it."""
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return {
            name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            for name in ("", SERVICE_NAME)
        }


def score(address: str) -> reward_pb2.ScoreResponse:
    with grpc.insecure_channel(address) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        return stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="score me")]), timeout=10)


def models_loaded(bg: BackgroundScorer) -> float:
    with urllib.request.urlopen(bg.http_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r"^synpref_scorer_models_loaded (\S+)$", text, re.M)
    assert found, "no synpref_scorer_models_loaded on /metrics"
    return float(found.group(1))


def assert_no_model(bg: BackgroundScorer) -> None:
    """Up and Ready, but not serving a model: gRPC and both HTTP shims say so at once."""
    assert health(bg.address) == {"": SERVING, SERVICE_NAME: NOT_SERVING}
    with pytest.raises(grpc.RpcError) as err:
        score(bg.address)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert NO_MODEL_WORDS in err.value.details() and "/admin/reload" in err.value.details()
    for route, body in (("/get_reward", {"query": ["hi"]}), ("/classify", {"input": "hi"})):
        status, answer = http("POST", bg.http_url + route, body)
        assert status == 503, (route, answer)
        assert NO_MODEL_WORDS in answer["error"] and "/admin/reload" in answer["error"], route
    assert models_loaded(bg) == 0


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_root with one checkpoint (`v1`) and the admin token beside it."""
    base = tmp_path_factory.mktemp("scorer-no-model")
    build_tiny_reward_model(base / "models" / "v1", arch="qwen3", seed=11)
    (base / "token").write_text(TOKEN + "\n")
    return base


def settings(root: Path, **kw: object) -> ScorerSettings:
    base: dict[str, object] = {
        "port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "admin_enabled": True,
        "admin_port": 0,
        "admin_token_file": str(root / "token"),
        "model_root": str(root / "models"),
    }
    base.update(kw)
    return ScorerSettings(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("configured", ["none", "missing"])
def test_starts_without_a_model_and_serves_after_an_admin_reload(root: Path, configured: str) -> None:
    models = {} if configured == "none" else {"best": ModelRef(path=str(root / "models" / "not-trained-yet"))}
    with BackgroundScorer(settings(root, models=models)) as bg:
        assert_no_model(bg)

        status, body = http("POST", bg.admin_url + "/admin/reload", {"model": "best", "path": "v1"}, TOKEN)
        assert status == 200, body
        assert health(bg.address) == {"": SERVING, SERVICE_NAME: SERVING}
        response = score(bg.address)
        assert len(response.rewards) == 1 and response.metadata.model == "best"
        assert response.metadata.version == "v1"
        status, body = http("POST", bg.http_url + "/get_reward", {"query": ["hi"]})
        assert status == 200 and len(body["rewards"]) == 1, body
        assert models_loaded(bg) == 1

        # And back: with the last model unloaded the scorer is up but serves nothing again.
        status, body = http("POST", bg.admin_url + "/admin/unload", {"model": "best"}, TOKEN)
        assert status == 200, body
        assert_no_model(bg)


def test_a_missing_checkpoint_is_loaded_once_it_appears(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "models" / "best"
    bg = BackgroundScorer(settings(root, models={"best": ModelRef(path=str(target))}))
    bg.server.missing_poll_s = 0.05
    with bg:
        assert_no_model(bg)
        # Built aside, then renamed into place, as a copy onto the volume would finish.
        build_tiny_reward_model(tmp_path / "staging", arch="qwen3", seed=12)
        target.parent.mkdir()
        (tmp_path / "staging").rename(target)
        wait_until(lambda: health(bg.address)[SERVICE_NAME] == SERVING, 60, "the appeared checkpoint to load")
        assert score(bg.address).metadata.version == "best"
        assert bg.server.missing == {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_process_stays_up_with_a_missing_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`synpref scorer`'s serve(): a missing checkpoint is one warning, not exit 1; SIGTERM exits 0."""
    from synpref.services.scorer.main import serve
    from synpref.shared.config import load_settings

    absent = tmp_path / "models" / "best"
    port = free_port()
    scorer = ScorerSettings(port=port, http_port=0, metrics_port=0, models={"best": ModelRef(path=str(absent))})

    def missing_warnings() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(absent) in r.getMessage()
        ]

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(serve(load_settings(scorer=scorer)))
        deadline = loop.time() + 60
        while not missing_warnings():  # logged once the load was tried, after the listeners are up
            assert not running.done(), f"serve() ended with {running.result()}"
            assert loop.time() < deadline, "no warning about the missing checkpoint"
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name, expected in (("", SERVING), (SERVICE_NAME, NOT_SERVING)):
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert answer.status == expected, name
        assert not running.done()
        os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it: drain and return
        return await asyncio.wait_for(running, 60)

    with caplog.at_level(logging.WARNING, logger="synpref.services.scorer"):
        assert asyncio.run(scenario()) == 0
    warnings = missing_warnings()
    assert len(warnings) == 1 and "does not exist" in warnings[0] and "/admin/reload" in warnings[0]


def test_a_checkpoint_that_is_there_but_does_not_load_is_still_fatal(tmp_path: Path) -> None:
    from synpref.services.scorer.main import serve
    from synpref.shared.config import load_settings

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    scorer = ScorerSettings(port=0, http_port=0, metrics_port=0, models={"best": ModelRef(path=str(broken))})
    assert asyncio.run(asyncio.wait_for(serve(load_settings(scorer=scorer)), 120)) == 1
