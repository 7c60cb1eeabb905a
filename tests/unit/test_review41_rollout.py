"""Session 41's review of the scorer under a rolling update: on SIGTERM the scorer turned NOT_SERVING and closed
its listeners at once, while Kubernetes takes seconds to take the pod out of kube-proxy's, the ingresses' and
the clients' endpoints; a connection routed here meanwhile was refused. scorer.shutdown_delay_s is a lame duck:
not ready, still serving. Real BackgroundScorers on loopback with a fake model (reward = token count)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from synpref.services.scorer.server import SERVICE_NAME, BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.v1 import reward_pb2, reward_pb2_grpc
from testing.scorer_fakes import LengthBackend
from testing.tiny import build_tiny_tokenizer

DELAY_S = 3.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REQUEST = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="a reward call during a rollout")])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _scorer(tokenizer: Any, delay_s: float) -> BackgroundScorer:
    def factory(kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> LengthBackend:
        return LengthBackend(tokenizer)

    settings = ScorerSettings(
        port=0,
        http_port=0,
        metrics_port=0,
        drain_s=1.0,
        shutdown_delay_s=delay_s,
        models={"best": ModelRef(path="fake")},
        max_wait_ms=0.0,
    )
    return BackgroundScorer(settings, factory)


def _status(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def _wait_not_ready(address: str) -> None:
    """Block until health "" reports NOT_SERVING (a Watch: each change is pushed, no polling)."""
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        for update in watch:
            if update.status == NOT_SERVING:
                watch.cancel()
                return
    pytest.fail('health "" never turned NOT_SERVING')


def _score_on_a_new_connection(address: str) -> list[float]:
    """One Score call and one ScoreStream message, each on a fresh channel (a new TCP connection: what a client
    that kube-proxy still routes here opens), without wait_for_ready or retries."""
    with grpc.insecure_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        rewards = list(stub.Score(REQUEST, timeout=5).rewards)
        (streamed,) = list(stub.ScoreStream(iter([REQUEST]), timeout=5))
    assert list(streamed.rewards) == rewards
    return rewards


def _get_reward(url: str) -> list[float]:
    body = json.dumps({"query": ["a reward call during a rollout"]}).encode()
    request = urllib.request.Request(f"{url}/get_reward", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return list(json.load(response)["rewards"])


def test_after_sigterm_the_scorer_is_not_ready_but_serves_new_connections_for_the_delay(tokenizer: Any) -> None:
    # The defect: the stop closed the listeners right after turning NOT_SERVING, so every reward call that
    # kube-proxy routed to the pod in the seconds before its endpoint removal propagated got "connection
    # refused" (an RL trainer's calls failed on every rollout and HPA scale-in).
    bg = _scorer(tokenizer, DELAY_S).start()
    stopping = None
    try:
        before = _score_on_a_new_connection(bg.address)
        t0 = time.monotonic()
        stopping = asyncio.run_coroutine_threadsafe(bg.server.stop(), bg.loop)  # what SIGTERM runs
        try:
            _wait_not_ready(bg.address)
            assert _status(bg.address, SERVICE_NAME) == NOT_SERVING
            # A reload meanwhile (an admin call, the models file) must not make the pod look ready again.
            bg.run(bg.server.registry.reload("other", ModelRef(path="fake-2")))
            assert _status(bg.address, SERVICE_NAME) == NOT_SERVING
            assert _status(bg.address, "") == NOT_SERVING
            assert _score_on_a_new_connection(bg.address) == before
            assert _get_reward(bg.http_url) == before
            # HTTP's /health says not ready too, for a load balancer that probes it rather than gRPC health.
            with pytest.raises(urllib.error.HTTPError) as unready:
                urllib.request.urlopen(f"{bg.http_url}/health", timeout=5)
            assert unready.value.code == 503
        except (grpc.RpcError, OSError) as exc:
            pytest.fail(f"a call routed to the pod right after SIGTERM failed: {exc!r}")
        assert not stopping.done(), "the calls above were not made during the delay"
        stopping.result(30)
        assert time.monotonic() - t0 >= DELAY_S
        # After the delay the server stopped as before: the listener is closed.
        with pytest.raises(grpc.RpcError) as refused:
            _score_on_a_new_connection(bg.address)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if stopping is None:
            bg.stop()
        else:
            stopping.result(30)
            bg.loop.call_soon_threadsafe(bg.loop.stop)


def test_a_scorer_that_was_never_ready_stops_without_the_delay(tokenizer: Any) -> None:
    # Not ready, the pod was in no endpoints: nothing can be routed to it, so the lame duck would only hold
    # a pod whose load failed (main stops it at once) for nothing.
    bg = _scorer(tokenizer, 60.0).start(load=False)
    t0 = time.monotonic()
    bg.stop()
    assert time.monotonic() - t0 < 10.0


def test_zero_delay_keeps_the_old_stop(tokenizer: Any) -> None:
    bg = _scorer(tokenizer, 0.0).start()
    _score_on_a_new_connection(bg.address)
    t0 = time.monotonic()
    bg.stop()
    assert time.monotonic() - t0 < DELAY_S
