"""Review 45, the desk: an unreadable review queue is a 503 logged once per outage, pair ids are checked at intake by
the verdict's rule, and a decision too large for its topic is dead-lettered instead of blocking the outbox."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaConnectionError, KafkaTimeoutError
from kafka.structs import TopicPartition

from synpref.services.desk import MemoryReviewQueue, MemoryVerdictSink, ReviewDesk, make_app, web
from synpref.services.desk.core import DeskCore, DeskError, parse_verdict
from synpref.services.desk.inbox import ReviewInbox, pass_through
from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.shared.config import DeskSettings, KafkaSettings, TopicSettings
from synpref.shared.kafka.batch import plan_batch
from synpref.shared.kafka.clients import DeliveryError
from synpref.shared.kafka.codec import DLQ_KIND, DLQ_REASON, Outgoing, decode_record, encode_record, header_map
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord
from testing.group_consumer import Broker, LimitedProducer

TOKEN = "alice-token-0123456789"
TOKENS = {"alice": TOKEN}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TP = TopicPartition("in", 0)
BAD_IDS = ["has space", "x" * 129, "abc\n", "ünï", "a/b"]


def record(i: int, text: str = "", pair_id: str | None = None) -> PairRecord:
    pair = new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"good {i}{text}"}],
                    [{"role": "assistant", "content": f"bad {i}"}], source="unit")  # fmt: skip
    out = new_record(pair)
    if pair_id is not None:
        out.pair.id = pair_id
    return out


# -- 1. an unreadable queue is a 503, logged once per outage ----------------------------------------------------------


class DownSource(MemoryReviewQueue):
    """A review source whose fetch fails while `down`, as a Kafka source does with the broker away."""

    down = True

    async def fetch(self, limit: int) -> list[tuple[Any, Any]]:
        if self.down:
            raise KafkaConnectionError("kafka-0.internal:9092 refused: secret-internal-detail")
        return await super().fetch(limit)


def outage_logs(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage().split(" (")[0]) for r in caplog.records if "review queue" in r.getMessage()]


def test_next_answers_503_with_retry_after_while_the_queue_cannot_be_read_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        source = DownSource()
        source.push([record(1)])
        desk = ReviewDesk(source, MemoryVerdictSink(), DeskSettings(), tokens=TOKENS)
        async with TestClient(TestServer(make_app(desk, background=False))) as client:
            for _ in range(4):
                resp = await client.get("/api/next", headers=AUTH)
                body = await resp.json()
                assert resp.status == 503, body  # before: 500 "internal error; the desk logged it"
                assert resp.headers["Retry-After"] == "5" and "unreachable" in body["error"]
                assert "secret-internal-detail" not in await resp.text()
                assert "Content-Security-Policy" in resp.headers
            await desk.tick()  # the tick's fetch fails too: the same outage, no second log
            source.down = False
            resp = await client.get("/api/next", headers=AUTH)
            assert resp.status == 200 and (await resp.json())["pair"]["pair_id"] == record(1).pair.id
            source.down = True
            await desk.tick()

    with caplog.at_level(logging.DEBUG, logger="synpref.desk"):
        asyncio.run(main())
    assert outage_logs(caplog) == [
        (logging.ERROR, "review queue cannot be read"),
        (logging.INFO, "review queue can be read again"),
        (logging.ERROR, "review queue cannot be read"),
    ]
    assert not [
        r for r in caplog.records if "failed" in r.getMessage()
    ]  # neither "GET /api/next failed" nor the tick's


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ClosingRunner:
    """Stands in for the StageRunner: the first poll raises DeliveryError (the desk closes the clients and backs off
    for 1 s), later ones read nothing."""

    class Consumer:
        def assignment(self) -> set[TopicPartition]:
            return set()

        def paused(self) -> set[TopicPartition]:
            return set()

        def bootstrap(self, timeout_ms: int | None = None, refresh: bool = False) -> None:
            return None

    def __init__(self) -> None:
        self.consumer: Any = None
        self.opens = 0

    def open(self) -> None:
        self.opens += 1
        self.consumer = self.Consumer()

    def close(self) -> None:
        self.consumer = None

    def run_once(self) -> int:
        if self.opens == 1:
            raise DeliveryError("dead letters were not acknowledged")
        return 0

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        return None


def test_a_kafka_source_waiting_out_its_reconnect_backoff_is_still_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        clock = Clock()
        queues = KafkaDeskQueues(KafkaSettings(), TopicSettings(), "g", clock=clock)
        runner = ClosingRunner()
        queues.runner = runner  # type: ignore[assignment]
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        try:
            for _ in range(3):  # the failed poll, then two fetches inside the back-off: nothing read, not "no pairs"
                with pytest.raises(web.QueueUnreachable):
                    await desk.refill()
            assert runner.opens == 1
            clock.now += 1.0
            assert await desk.refill() == 0  # reconnected: the queue is readable (and empty) again
            assert runner.opens == 2
        finally:
            await queues.close()

    with caplog.at_level(logging.DEBUG, logger="synpref.desk"):
        asyncio.run(main())
    assert [level for level, _ in outage_logs(caplog)] == [logging.ERROR, logging.INFO]


def test_a_genuine_internal_error_is_still_a_500() -> None:
    class BrokenCore(DeskCore):
        def progress(self, annotator: str) -> dict[str, Any]:
            raise RuntimeError("a bug")

    async def main() -> None:
        desk = ReviewDesk(MemoryReviewQueue(), MemoryVerdictSink(), DeskSettings(), tokens=TOKENS, core=BrokenCore())
        async with TestClient(TestServer(make_app(desk, background=False))) as client:
            resp = await client.get("/api/next", headers=AUTH)
            assert resp.status == 500 and "Retry-After" not in resp.headers

    asyncio.run(main())


# -- 2. pair ids: one rule at intake and at verdict --------------------------------------------------------------------


def message(out: Outgoing, offset: int) -> ConsumerRecord:
    return ConsumerRecord(topic="in", partition=0, leader_epoch=0, offset=offset, timestamp=0, timestamp_type=0,
                          key=out.key, value=out.value, headers=out.headers, checksum=None,
                          serialized_key_size=len(out.key or b""), serialized_value_size=len(out.value),
                          serialized_header_size=0)  # fmt: skip


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_a_kafka_record_whose_id_no_verdict_can_name_is_dead_lettered_and_committed_past(bad_id: str) -> None:
    good = record(2)
    messages = [message(encode_record(record(1, pair_id=bad_id), "in"), 0), message(encode_record(good, "in"), 1)]
    plan = plan_batch(messages, pass_through, TopicSettings(), "desk", to_sink=True)
    assert [r.pair.id for _, r in plan.sunk] == [good.pair.id]
    assert plan.failed["failed"] == 1 and plan.dead_lettered == 1
    (dead,) = plan.outgoing
    headers = header_map(dead.headers)
    assert dead.topic == TopicSettings().dead_letter and headers[DLQ_KIND] == "failed"
    assert "pair id" in headers[DLQ_REASON] and decode_record(dead.value, dead.headers).pair.id == bad_id
    inbox = ReviewInbox()
    inbox.write_sourced(plan.sunk, plan.sunk_from)
    assert inbox.flush({TP: 2}) == {TP: 1}  # before: {} -- offset 0 held open for a pair nobody could answer
    inbox.settle([h for _, h in inbox.take(10)])
    assert inbox.safe_offsets() == {TP: 2}


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_intake_and_verdict_refuse_the_same_ids(bad_id: str) -> None:
    with pytest.raises(DeskError) as refused:
        DeskCore().add(record(1, pair_id=bad_id))
    assert refused.value.status == 400 and "pair id" in refused.value.message
    with pytest.raises(DeskError):
        parse_verdict({"pair_id": bad_id, "choice": 1})
    ok = "Ab0_.:-" * 18 + "xy"  # 128 characters
    assert DeskCore().add(record(1, pair_id=ok)) and parse_verdict({"pair_id": ok, "choice": 1})[0] == ok


def test_the_embedded_desk_logs_and_settles_a_record_it_refuses(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[int, int, int]:
        queue = MemoryReviewQueue()
        queue.push([record(1, pair_id="abc\n"), record(2)])
        desk = ReviewDesk(queue, MemoryVerdictSink(), DeskSettings(), tokens=TOKENS)
        return await desk.refill(), desk.core.pending, queue.acked

    with caplog.at_level(logging.WARNING, logger="synpref.desk"):
        assert asyncio.run(main()) == (1, 1, 1)
    assert any("dropping review record: pair id 'abc\\n'" in r.getMessage() for r in caplog.records), caplog.text


# -- 3. a decision too large for its topic ----------------------------------------------------------------------------


class Consumer(ClosingRunner.Consumer):
    def close(self, autocommit: bool = True) -> None:
        return None


def sized_queues(max_bytes: int, topic_limits: dict[str, int] | None = None) -> tuple[KafkaDeskQueues, LimitedProducer]:
    """The desk's queues on a producer that refuses at send() a message over its max_request_size, as kafka-python's."""
    queues = KafkaDeskQueues(KafkaSettings(max_message_bytes=max_bytes), TopicSettings(), "g")
    producer = LimitedProducer(Broker({}), max_request_size=max_bytes)
    queues.runner.producer = producer
    queues.runner.consumer = Consumer()  # connected: no broker is asked for anything
    queues.runner.topic_limits = topic_limits or {}
    return queues, producer


def test_a_decision_over_the_message_limit_goes_to_the_dead_letter_topic_and_leaves_the_outbox() -> None:
    topics = TopicSettings()
    big, small = record(1, "x" * 6000), record(2)

    async def main() -> tuple[ReviewDesk, MemoryReviewQueue, LimitedProducer]:
        queues, producer = sized_queues(4096)
        queue = MemoryReviewQueue()
        queue.push([big, small])
        desk = ReviewDesk(queue, queues.sink, DeskSettings(), tokens=TOKENS)
        try:
            assert await desk.refill() == 2
            for _ in range(2):
                entry = desk.core.next_for("alice")
                assert entry is not None
                # "cannot decide": discarded as it came, not flipped to a new id
                assert await desk.submit("alice", entry.pair_id, 0, "", entry.assignments["alice"])
            await desk.tick()
        finally:
            await desk.close()
        return desk, queue, producer

    desk, queue, producer = asyncio.run(main())
    assert desk._outbox == [] and queue.acked == 2  # before: the big one stayed in the outbox, retried on every tick
    acked = [m for log in producer.topics.logs.values() for m in log]
    by_topic = {m.topic: (m.key, m.value, header_map(m.headers)) for m in acked}
    assert set(by_topic) == {topics.discarded, topics.dead_letter} and len(producer.sent) == 2
    key, _, headers = by_topic[topics.dead_letter]
    assert key == big.pair.id.encode() and headers[DLQ_KIND] == "too-large"
    assert f"over the 4096-byte message limit of topic {topics.discarded}" in headers[DLQ_REASON]
    assert by_topic[topics.discarded][0] == small.pair.id.encode()


def test_a_topic_limit_below_the_config_counts_and_a_transient_failure_still_raises() -> None:
    topics = TopicSettings()

    async def main() -> LimitedProducer:
        queues, producer = sized_queues(1 << 20, {topics.discarded: 2048})
        try:
            await queues.sink.write([("discarded", record(1, "y" * 3000)), ("verified", record(2, "y" * 3000))])
            assert [t for t, *_ in producer.sent] == [topics.dead_letter, topics.verified]
            producer.broker.error = KafkaTimeoutError("expired")
            with pytest.raises(DeliveryError):  # a broker away: the desk keeps the decision and retries
                await queues.sink.write([("verified", record(3))])
        finally:
            await queues.close()
        return producer

    asyncio.run(main())
