"""Review 42: RL clients skip a scorer that says NOT_SERVING, and the Kubernetes client does not retry on its own.

(1) The clients' round_robin sent calls to a scorer in its shutdown delay (health "" NOT_SERVING, still answering)
until DNS dropped it or the drain cut them. With client-side health checking (client/channel.py's service config)
round_robin skips it. Real scorers on loopback with a fake model (reward = token count + an offset per replica).
(2) shared/kube.py's ApiClient kept urllib3's 3 retries: a silent API server held one read for 4 request timeouts
before the controller's own back-off saw it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import grpc
import pytest
import urllib3
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from synpref.client import AsyncRewardClient, RewardClient
from synpref.services.scorer.server import BackgroundScorer
from synpref.shared.config import ModelRef, ScorerSettings
from synpref.shared.kube import api_client
from synpref.training import k8s_api
from synpref.training.k8s_job import JobBackend
from synpref.v1 import reward_pb2, reward_pb2_grpc
from testing.json_api import serving
from testing.scorer_fakes import LengthBackend
from testing.tiny import build_tiny_tokenizer

TEXT = "a reward call during a rollout"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class OffsetBackend(LengthBackend):
    """Reward = token count + `offset`: which replica answered shows in the reward."""

    def __init__(self, tokenizer: Any, offset: float) -> None:
        super().__init__(tokenizer)
        self.offset = offset

    def forward(self, batch: list[list[int]]) -> list[float]:
        return [r + self.offset for r in super().forward(batch)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _scorer(tokenizer: Any, offset: float, **settings: Any) -> BackgroundScorer:
    def factory(kind: str, path: str, device: str, dtype: str, max_length: int, compile: bool) -> LengthBackend:
        return OffsetBackend(tokenizer, offset)

    base: dict[str, Any] = {"port": 0, "http_port": 0, "metrics_port": 0, "drain_s": 1.0, "max_wait_ms": 0.0}
    return BackgroundScorer(ScorerSettings(models={"best": ModelRef(path="fake")}, **base, **settings), factory)


@pytest.fixture
def two_scorers(tokenizer: Any) -> Iterator[tuple[BackgroundScorer, BackgroundScorer]]:
    first = _scorer(tokenizer, 1000.0, shutdown_delay_s=3.0).start()
    second = _scorer(tokenizer, 2000.0).start()
    yield first, second
    for scorer in (first, second):
        if scorer.loop.is_running():
            scorer.stop(grace=1.0)


def _both(first_port: int, second_port: int) -> str:
    """A target resolving to both servers, as DNS resolves a headless Service to every ready pod."""
    return f"ipv4:127.0.0.1:{first_port},127.0.0.1:{second_port}"


def _set_health(scorer: BackgroundScorer, status: int) -> None:
    scorer.run(scorer.server.health.set("", status))


def _wait_health(address: str, status: int) -> None:
    """Block until health "" reports `status` (a Watch: each change is pushed)."""
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        for update in watch:
            if update.status == status:
                watch.cancel()
                return
    pytest.fail(f'health "" never turned {status}')


def _settle(replica: Callable[[], float], want: float, in_a_row: int = 5, limit: int = 100) -> None:
    """Call until `in_a_row` consecutive calls reach replica `want`: the client learns a health change from its own
    Watch, a moment after the server's. Round robin over both replicas never gets there (they alternate)."""
    run = 0
    for _ in range(limit):
        run = run + 1 if replica() == want else 0
        if run >= in_a_row:
            return
    pytest.fail(f"{limit} calls and never {in_a_row} in a row on replica {want}: the client still calls both")


def test_blocking_client_skips_a_scorer_whose_health_says_not_serving(
    two_scorers: tuple[BackgroundScorer, BackgroundScorer],
) -> None:
    first, second = two_scorers
    with RewardClient(_both(first.server.grpc_port, second.server.grpc_port), timeout=10.0) as client:

        def replica() -> float:
            return client.score([TEXT])[0] // 1000

        assert {replica() for _ in range(20)} == {1, 2}
        _set_health(first, NOT_SERVING)
        _settle(replica, 2)
        assert {replica() for _ in range(30)} == {2}
        _set_health(first, SERVING)  # back in: the client calls it again
        _settle(replica, 1, in_a_row=1)
        assert {replica() for _ in range(20)} == {1, 2}


def test_async_client_and_sessions_leave_a_scorer_in_its_shutdown_delay(
    two_scorers: tuple[BackgroundScorer, BackgroundScorer],
) -> None:
    # What a rolling update does: SIGTERM turns "" NOT_SERVING, the pod answers for shutdown_delay_s, then drains.
    first, second = two_scorers
    target = _both(first.server.grpc_port, second.server.grpc_port)

    async def calls() -> tuple[set[float], set[float], set[float]]:
        async with AsyncRewardClient(target, timeout=10.0) as client:
            before = {(await client.score([TEXT]))[0] // 1000 for _ in range(20)}
            stopping = asyncio.run_coroutine_threadsafe(first.server.stop(), first.loop)
            await asyncio.to_thread(_wait_health, first.address, NOT_SERVING)
            for _ in range(100):  # the client's own Watch learns it a moment later (bounded, as _settle)
                if {(await client.score([TEXT]))[0] // 1000 for _ in range(5)} == {2}:
                    break
            during = {(await client.score([TEXT]))[0] // 1000 for _ in range(30)}
            streamed: set[float] = set()
            for _ in range(6):  # each session's stream is opened now: none on the stopping scorer
                async with client.stream() as session:
                    streamed.add((await session.score([TEXT]))[0] // 1000)
            assert not stopping.done(), "the calls above were not made during the shutdown delay"
            await asyncio.wrap_future(stopping)
            return before, during, streamed

    before, during, streamed = asyncio.run(asyncio.wait_for(calls(), 60))
    first.loop.call_soon_threadsafe(first.loop.stop)
    first._thread.join(10)  # else the fixture may find the loop still running and stop the stopped server again
    assert before == {1, 2} and during == {2} and streamed == {2}


class PlainRewards(reward_pb2_grpc.RewardServiceServicer):
    """A third-party scorer: RewardService only, no Health service."""

    def __init__(self, reward: float) -> None:
        self.reward = reward

    def Score(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext) -> reward_pb2.ScoreResponse:
        return reward_pb2.ScoreResponse(rewards=[self.reward] * len(request.items))


def test_servers_without_the_health_service_count_as_healthy() -> None:
    servers, ports = [], []
    for reward in (1.0, 2.0):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        reward_pb2_grpc.add_RewardServiceServicer_to_server(PlainRewards(reward), server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    try:
        with RewardClient(_both(*ports), timeout=10.0) as client:
            rewards = {client.score([TEXT])[0] for _ in range(20)}
    finally:
        for server in servers:
            server.stop(None)
    assert rewards == {1.0, 2.0}


def test_a_call_to_a_scorer_still_loading_ends_within_its_timeout_then_succeeds_once_ready(tokenizer: Any) -> None:
    # "" is NOT_SERVING until the start-up load is over: with health checking the channel has no backend, the
    # first try fails fast with UNAVAILABLE, the retries wait for a ready backend (wait_for_ready) up to the timeout.
    scorer = _scorer(tokenizer, 1000.0).start(load=False)
    try:
        with RewardClient(scorer.address, timeout=1.5) as client:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.score([TEXT])
            assert time.monotonic() - t0 < 1.5 + 1.0
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            scorer.run(scorer.server.load())
            assert client.score([TEXT], timeout=10.0)[0] // 1000 == 1
    finally:
        scorer.stop(grace=1.0)


# --- (2) the Kubernetes client: one try per request ---------------------------------------------------------------


class Silent(BaseHTTPRequestHandler):
    """Accepts every request and never answers (until `release`): an API server during a control-plane upgrade."""

    requests = 0
    release = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests += 1
        self.release.wait(30)
        self.close_connection = True


def test_a_silent_api_servers_read_gives_up_after_one_request_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # urllib3's default 3 retries asked a silent GET 4 times: 4 x 30 s before the controller's back-off saw it.
    monkeypatch.setattr(k8s_api, "REQUEST_TIMEOUT_S", 0.5)
    handler = type("SilentApi", (Silent,), {"requests": 0, "release": threading.Event()})
    with serving(handler) as url:
        try:
            config = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
            (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
            backend = JobBackend(api_client(str(tmp_path / "kubeconfig")))
            t0 = time.monotonic()
            with pytest.raises(urllib3.exceptions.HTTPError):
                backend.batch.read_namespaced_job("job", "ns")
            elapsed = time.monotonic() - t0
        finally:
            handler.release.set()
    assert handler.requests == 1, f"{handler.requests} requests for one read"
    assert elapsed < 2 * 0.5, f"{elapsed:.1f}s for one read with a 0.5 s request timeout"
