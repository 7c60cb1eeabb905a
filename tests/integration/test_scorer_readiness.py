"""A scorer is live once it listens and Ready once the models it starts with are loaded.

The chart's startup and liveness probes ask health service "liveness", its readiness probe "" (the
overall service). "" used to turn SERVING with the listeners, so a pod added by the HPA, or a rolling
update's new pod, got RL traffic while it was still loading its model (minutes at 8B) and failed every
request meanwhile. Configured checkpoints that do not exist yet must not hold readiness back (the
first `helm install --wait` comes before any model is trained). Real gRPC servers on loopback; fake
backends whose load waits for a gate, around a real tiny tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from synpref.services.scorer.server import LIVENESS, OVERALL, SERVICE_NAME, BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.v1 import reward_pb2, reward_pb2_grpc
from testing.scorer_fakes import LengthBackend
from testing.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


class GatedLoads:
    """A backend factory: a path that does not exist fails as a real load does; one that exists signals
    `entered`, waits for `gate`, then loads, unless it is a folder named `broken`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> LengthBackend:
        if not Path(path).exists():
            raise FileNotFoundError(path)
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        if Path(path).name == "broken":
            raise ValueError(f"{path} is not a checkpoint")
        return LengthBackend(self.tokenizer)


def health(address: str) -> dict[str, int]:
    """The status of each of the scorer's health services, as a kubelet probe or a client asks it."""
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return {
            name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            for name in (LIVENESS, OVERALL, SERVICE_NAME)
        }


def start_then_load(bg: BackgroundScorer) -> Future[None]:
    """Start as `synpref scorer` does (main.serve): listeners first, then the load pass in the background."""
    bg.start(load=False)
    return asyncio.run_coroutine_threadsafe(bg.server.load(), bg.loop)


def settings(**kw: Any) -> ScorerSettings:
    return ScorerSettings(port=0, http_port=0, metrics_port=0, device="cpu", **kw)


def test_ready_once_the_configured_checkpoints_that_exist_are_loaded(tokenizer: Any, tmp_path: Path) -> None:
    (tmp_path / "best").mkdir()
    models = {"best": ModelRef(path=str(tmp_path / "best")), "later": ModelRef(path=str(tmp_path / "not-yet"))}
    loads = GatedLoads(tokenizer)
    bg = BackgroundScorer(settings(models=models), loads)
    try:
        loading = start_then_load(bg)
        assert loads.entered.wait(30), "the load of best never began"
        # Loading: alive (startup and liveness probes pass), not Ready (no traffic), requests told to retry.
        assert health(bg.address) == {LIVENESS: SERVING, OVERALL: NOT_SERVING, SERVICE_NAME: NOT_SERVING}
        with grpc.insecure_channel(bg.address) as ch, pytest.raises(grpc.RpcError) as err:
            request = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="hi")])
            reward_pb2_grpc.RewardServiceStub(ch).Score(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        loads.gate.set()
        loading.result(30)
        # best is in; `later` has no checkpoint yet and is watched for, not waited for.
        assert health(bg.address) == {LIVENESS: SERVING, OVERALL: SERVING, SERVICE_NAME: SERVING}
        assert sorted(bg.server.registry.models) == ["best"] and sorted(bg.server.missing) == ["later"]
    finally:
        loads.gate.set()
        bg.stop()


def test_ready_once_the_models_file_entries_are_loaded(tokenizer: Any, tmp_path: Path) -> None:
    """An HPA's new pod with scorer.models_file (the controller's models): Ready once they are in."""
    (tmp_path / "v3").mkdir()
    models_file = tmp_path / "scorer-models.json"
    models_file.write_text(json.dumps({"best": {"path": str(tmp_path / "v3"), "version": "v3"}}))
    loads = GatedLoads(tokenizer)
    bg = BackgroundScorer(settings(models_file=str(models_file)), loads)
    try:
        loading = start_then_load(bg)
        assert loads.entered.wait(30), "the load of the models file's entry never began"
        assert health(bg.address)[OVERALL] == NOT_SERVING
        loads.gate.set()
        loading.result(30)
        assert health(bg.address) == {LIVENESS: SERVING, OVERALL: SERVING, SERVICE_NAME: SERVING}
        assert bg.server.registry.models["best"].version == "v3"
    finally:
        loads.gate.set()
        bg.stop()


def test_ready_at_once_when_nothing_it_starts_with_exists_yet(tokenizer: Any, tmp_path: Path) -> None:
    """A fresh install: the configured checkpoint and the models file are not there yet."""
    absent = {"best": ModelRef(path=str(tmp_path / "not-trained-yet"))}
    loads = GatedLoads(tokenizer)
    bg = BackgroundScorer(settings(models=absent, models_file=str(tmp_path / "no-file.json")), loads)
    try:
        start_then_load(bg).result(30)
        assert health(bg.address) == {LIVENESS: SERVING, OVERALL: SERVING, SERVICE_NAME: NOT_SERVING}
        assert not loads.entered.is_set()
    finally:
        bg.stop()


def test_never_ready_when_a_checkpoint_that_exists_does_not_load(tokenizer: Any, tmp_path: Path) -> None:
    """Fatal: the load pass raises (`synpref scorer` exits 1); the pod must not get traffic meanwhile."""
    (tmp_path / "broken").mkdir()
    loads = GatedLoads(tokenizer)
    loads.gate.set()
    bg = BackgroundScorer(settings(models={"best": ModelRef(path=str(tmp_path / "broken"))}), loads)
    try:
        with pytest.raises(ValueError, match="not a checkpoint"):
            start_then_load(bg).result(30)
        assert health(bg.address) == {LIVENESS: SERVING, OVERALL: NOT_SERVING, SERVICE_NAME: NOT_SERVING}
    finally:
        bg.stop()
