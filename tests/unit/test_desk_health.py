"""The desk's Kafka health: reconnect back-off, KafkaHealth, the idle metadata request, /healthz vs /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from kafka.errors import KafkaConnectionError, KafkaTimeoutError
from kafka.structs import TopicPartition

from synpref.services.desk import MemoryReviewQueue, MemoryVerdictSink, ReviewDesk, make_app
from synpref.services.desk.kafka_queue import KafkaDeskQueues, KafkaHealth, ReconnectBackoff, ReconnectPending
from synpref.shared.config import DeskSettings, KafkaSettings, TopicSettings
from synpref.shared.kafka.clients import DeliveryError

TOKENS = {"alice": "alice-token-0123456789"}
TICK_S = 0.5
ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".cache" / "bin" / "helm"  # `make helm` builds it (tests/integration/test_chart.py renders with it too)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RefusingRunner:
    """Stands in for the StageRunner: every poll after the first `refusals` connections raises DeliveryError, as a
    dead-letter producer refused for good does; later connections poll fine."""

    class Consumer:
        def assignment(self) -> set[TopicPartition]:
            return set()

        def paused(self) -> set[TopicPartition]:
            return set()

        def bootstrap(self, timeout_ms: int | None = None, refresh: bool = False) -> None:
            """The metadata request of an idle desk: the broker answers."""

    def __init__(self, refusals: int, unreachable: int = 0) -> None:
        self.refusals = refusals
        self.unreachable = unreachable
        """The first `unreachable` connections fail, as with no broker to reach."""
        self.consumer: Any = None
        self.opens = 0

    def open(self) -> None:
        self.opens += 1
        if self.opens <= self.unreachable:
            raise KafkaConnectionError("no broker reachable")
        self.consumer = self.Consumer()

    def close(self) -> None:
        self.consumer = None

    def run_once(self) -> int:
        if self.opens <= self.refusals:
            raise DeliveryError("dead letters were not acknowledged")
        return 0

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        return None


def queues_with(runner: RefusingRunner, clock: Clock, unready_after_s: float = 60.0) -> KafkaDeskQueues:
    queues = KafkaDeskQueues(KafkaSettings(), TopicSettings(), "g", unready_after_s=unready_after_s, clock=clock)
    queues.runner = runner  # type: ignore[assignment]
    return queues


async def tick_for(queues: KafkaDeskQueues, clock: Clock, seconds: float) -> None:
    """The desk's fetches, one every TICK_S of the fake clock for `seconds`."""
    for _ in range(int(seconds / TICK_S)):
        with contextlib.suppress(DeliveryError):
            await queues.source.fetch(10)
        clock.now += TICK_S


def test_backoff_doubles_up_to_its_cap_and_resets_on_success() -> None:
    clock = Clock()
    backoff = ReconnectBackoff(first_s=1.0, max_s=60.0, clock=clock)
    assert backoff.wait_s() == 0
    assert [backoff.failed() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff.wait_s() == 60
    clock.now += 59.5
    assert backoff.wait_s() == 0.5
    for _ in range(2000):  # a long outage: the exponent must not overflow
        backoff.failed()
    assert backoff.wait_s() == 60
    backoff.succeeded()
    assert backoff.wait_s() == 0 and backoff.failed() == 1


def test_a_producer_refused_for_good_is_reconnected_with_a_backoff_not_every_tick() -> None:
    async def main() -> None:
        clock, runner = Clock(), RefusingRunner(refusals=10**6)
        queues = queues_with(runner, clock)
        try:
            await tick_for(queues, clock, 300.0)  # 600 ticks
            # Reconnects after 1, 2, 4, 8, 16, 32, 60, 60, 60 ... s: about 10 in 300 s, not one per tick (600).
            assert 8 <= runner.opens <= 12, runner.opens
        finally:
            await queues.close()

    asyncio.run(main())


def test_the_backoff_resets_after_a_poll_succeeds() -> None:
    async def main() -> None:
        clock, runner = Clock(), RefusingRunner(refusals=4)
        queues = queues_with(runner, clock)
        try:
            await tick_for(queues, clock, 1 + 2 + 4 + 8 + 1)  # 4 refused connections, then a fifth that works
            assert runner.opens == 5 and queues.backoff.failures == 0
            runner.refusals = 6  # refused again: the first delay (1 s) again, not the 16 s that came next before
            await tick_for(queues, clock, 1.5)
            assert runner.opens == 6 and queues.backoff.failures == 2  # the sixth was refused too
        finally:
            await queues.close()

    asyncio.run(main())


def test_a_decision_reconnects_at_once_after_a_failed_poll_but_waits_out_a_failed_connection() -> None:
    async def main() -> None:
        clock, runner = Clock(), RefusingRunner(refusals=1)
        queues = queues_with(runner, clock)
        try:
            with pytest.raises(DeliveryError):
                await queues.source.fetch(10)  # connection 1: the poll is refused, the clients closed
            assert runner.consumer is None and queues.backoff.wait_s() == 1.0
            assert await queues.source.fetch(10) == [] and runner.opens == 1  # the tick waits out the back-off
            await queues.source.ack([])  # an annotator's decision does not
            assert runner.opens == 2
        finally:
            await queues.close()
        clock, runner = Clock(), RefusingRunner(refusals=0, unreachable=1)
        queues = queues_with(runner, clock)
        try:
            with pytest.raises(KafkaConnectionError):
                await queues.source.ack([])
            with pytest.raises(ReconnectPending):  # no broker: decisions wait too, or every tick's retry reconnects
                await queues.source.ack([])
            assert runner.opens == 1
            clock.now += 1.0
            await queues.source.ack([])
            assert runner.opens == 2
        finally:
            await queues.close()

    asyncio.run(main())


def test_health_names_the_operation_failing_for_longer_than_the_bound_and_forgets_it_on_success() -> None:
    clock = Clock()
    health = KafkaHealth(clock)
    health.failed("write", DeliveryError("broker host kafka-0.internal:9092 down"))
    clock.now += 30
    health.failed("write", DeliveryError("again"))  # still failing since the first one
    assert health.problem(60) is None
    clock.now += 31
    problem = health.problem(60)
    assert problem is not None and "Kafka write failing for 61s (DeliveryError)" in problem
    assert "kafka-0.internal" not in problem  # /readyz answers anyone: no broker names
    health.succeeded("read")  # another operation working does not hide this one
    assert health.problem(60) is not None
    health.succeeded("write")
    assert health.problem(60) is None


def test_readyz_follows_the_kafka_queue_and_healthz_stays_ok() -> None:
    async def main() -> None:
        clock, runner = Clock(), RefusingRunner(refusals=10**6)
        queues = queues_with(runner, clock, unready_after_s=20.0)
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        async with TestClient(TestServer(make_app(desk, background=False))) as client:

            async def status(path: str) -> tuple[int, dict[str, Any]]:
                resp = await client.get(path)
                return resp.status, await resp.json()

            assert await status("/readyz") == (200, {"status": "ready"})
            await tick_for(queues, clock, 15.0)
            assert (await status("/readyz"))[0] == 200  # failing, but not for longer than the bound yet
            await tick_for(queues, clock, 10.0)
            code, body = await status("/readyz")
            assert code == 503 and body["status"] == "unready"
            assert body["reason"].startswith("Kafka read failing for 25s (DeliveryError)")
            assert await status("/healthz") == (200, {"status": "ok"})  # liveness: a restart would not mend Kafka
            runner.refusals = 0  # Kafka works again: the next connection polls
            await tick_for(queues, clock, 61.0)
            assert await status("/readyz") == (200, {"status": "ready"})

    asyncio.run(main())


def test_the_embedded_desk_is_always_ready() -> None:
    async def main() -> None:
        desk = ReviewDesk(MemoryReviewQueue(), MemoryVerdictSink(), DeskSettings(), tokens=TOKENS)
        async with TestClient(TestServer(make_app(desk, background=False))) as client:
            resp = await client.get("/readyz")
            assert resp.status == 200 and await resp.json() == {"status": "ready"}

    asyncio.run(main())


@pytest.mark.parametrize("bound", [0, -1])
def test_unready_after_s_must_be_positive(bound: float) -> None:
    with pytest.raises(ValueError, match="unready_after_s"):
        DeskSettings.model_validate({"unready_after_s": bound})


@pytest.mark.skipif(not HELM.exists(), reason="no helm in .cache/bin: run `make helm`")
def test_the_chart_probes_liveness_on_healthz_and_readiness_on_readyz_and_passes_desk_settings() -> None:
    chart = ROOT / "charts" / "synpref"
    desk = '{"trusted_proxies": ["10.244.0.0/16"], "unready_after_s": 30}'
    args = [
        "template",
        "rel",
        str(chart),
        "-f",
        str(chart / "ci" / "base-values.yaml"),
        "--set-json",
        f"config.desk={desk}",
    ]
    proc = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-desk")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    config = yaml.safe_load(configmap["data"]["config.yaml"])["desk"]
    assert config["trusted_proxies"] == ["10.244.0.0/16"] and config["unready_after_s"] == 30
    assert DeskSettings.model_validate(config).trusted_proxies[0].num_addresses == 2**16


class DownSource(MemoryReviewQueue):
    """A review source whose fetch fails while `down`, the same way every time."""

    down = True

    async def fetch(self, limit: int) -> list[tuple[Any, Any]]:
        if self.down:
            raise DeliveryError("dead letters were not acknowledged")
        return await super().fetch(limit)


def test_a_tick_error_that_repeats_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        source = DownSource()
        desk = ReviewDesk(source, MemoryVerdictSink(), DeskSettings(), tokens=TOKENS)
        for _ in range(5):
            await desk.tick()
        source.down = False
        await desk.tick()
        source.down = True
        await desk.tick()

    with caplog.at_level(logging.DEBUG, logger="synpref.desk"):
        asyncio.run(main())
    said = [(r.levelno, r.getMessage().split(" (")[0]) for r in caplog.records if "review queue" in r.getMessage()]
    # Five failures in a row: one traceback for the outage; after a good tick the next failure is an ERROR again.
    assert said == [(logging.ERROR, "review queue cannot be read"), (logging.INFO, "review queue can be read again"),
                    (logging.ERROR, "review queue cannot be read")]  # fmt: skip
    assert not [r for r in caplog.records if r.getMessage() == "desk tick failed; retrying"]


class IdleRunner(RefusingRunner):
    """Connects and polls without error, `polled` records a poll (0: nothing arrives, the desk is idle); its
    consumer's metadata requests (KafkaConsumer.bootstrap(refresh=True)) time out while `down`, as when the broker
    is gone: kafka-python's poll only returns nothing then."""

    def __init__(self) -> None:
        super().__init__(refusals=0)
        self.polled = 0
        self.down = False
        self.probes: list[tuple[int | None, bool]] = []

    def open(self) -> None:
        super().open()
        self.consumer.bootstrap = self.bootstrap

    def bootstrap(self, timeout_ms: int | None = None, refresh: bool = False) -> None:
        self.probes.append((timeout_ms, refresh))
        if self.down:
            raise KafkaTimeoutError("Unable to bootstrap from ['kafka-0.internal:9092']")

    def run_once(self) -> int:
        return self.polled


@pytest.mark.parametrize(
    ("unready_after_s", "every_s", "timeout_ms"),
    [(2.0, 0.5, 1000), (20.0, 5.0, 5000), (60.0, 15.0, 5000), (600, 15, 5000)],
)
def test_the_metadata_request_is_bounded(unready_after_s: float, every_s: float, timeout_ms: int) -> None:
    queues = queues_with(IdleRunner(), Clock(), unready_after_s)
    try:
        assert (queues.probe_every_s, queues.probe_timeout_ms) == (every_s, timeout_ms)
    finally:
        queues._executor.shutdown()


def test_an_idle_desk_turns_unready_when_the_broker_is_gone_and_ready_when_it_is_back() -> None:
    async def main() -> None:
        clock, runner = Clock(), IdleRunner()
        queues = queues_with(runner, clock, unready_after_s=20.0)  # a metadata request every 5 s while idle
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        async with TestClient(TestServer(make_app(desk, background=False))) as client:

            async def status(path: str) -> tuple[int, dict[str, Any]]:
                resp = await client.get(path)
                return resp.status, await resp.json()

            await tick_for(queues, clock, 30.0)
            assert await status("/readyz") == (200, {"status": "ready"})
            # Every 5 s of the 60 ticks, not every tick; bounded, and a fresh round trip each time.
            assert 5 <= len(runner.probes) <= 7 and set(runner.probes) == {(5000, True)}, runner.probes
            runner.down, probes = True, len(runner.probes)  # the broker is gone; the desk polls nothing, no error
            await tick_for(queues, clock, 10.0)
            assert (await status("/readyz"))[0] == 200
            await tick_for(queues, clock, 10.5)  # unready_after_s since it was gone (and a tick)
            code, body = await status("/readyz")
            assert code == 503 and body["status"] == "unready", body
            assert body["reason"].startswith("Kafka metadata failing for "), body
            assert "(KafkaTimeoutError)" in body["reason"] and "kafka-0.internal" not in body["reason"]
            assert await status("/healthz") == (200, {"status": "ok"})
            assert len(runner.probes) - probes <= 5, runner.probes  # still one every 5 s
            runner.down = False
            await tick_for(queues, clock, 5.5)
            assert await status("/readyz") == (200, {"status": "ready"})

    asyncio.run(main())


def test_a_desk_that_hears_from_kafka_sends_no_metadata_request() -> None:
    async def main() -> None:
        clock, runner = Clock(), IdleRunner()
        queues = queues_with(runner, clock, unready_after_s=20.0)
        try:
            runner.polled = 1  # pairs arrive: every poll shows the broker is there
            await tick_for(queues, clock, 120.0)
            assert runner.probes == []
            runner.polled, runner.down = 0, True
            await tick_for(queues, clock, 30.0)
            assert queues.source.problem() is not None
            runner.polled = 1  # a poll that brings records is as good as an answered metadata request
            await tick_for(queues, clock, TICK_S)
            assert queues.source.problem() is None
        finally:
            await queues.close()

    asyncio.run(main())


def test_a_metadata_request_that_keeps_failing_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        clock, runner = Clock(), IdleRunner()
        queues = queues_with(runner, clock, unready_after_s=20.0)
        try:
            runner.down = True
            await tick_for(queues, clock, 60.0)  # 12 failed requests
            runner.down = False
            await tick_for(queues, clock, 10.0)
            runner.down = True
            await tick_for(queues, clock, 10.0)
        finally:
            await queues.close()

    with caplog.at_level(logging.DEBUG, logger="synpref.desk.kafka"):
        asyncio.run(main())
    said = [(r.levelno, r.getMessage().split(" (")[0]) for r in caplog.records if r.name == "synpref.desk.kafka"]
    failed = "desk: Kafka did not answer a metadata request"
    assert [s for s in said if s[0] > logging.DEBUG] == [
        (logging.WARNING, failed),
        (logging.INFO, "desk: Kafka answers again"),
        (logging.WARNING, failed),
    ], said
    assert said.count((logging.DEBUG, failed)) >= 10
