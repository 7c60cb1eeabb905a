"""The controller's Kafka executor raises when its published batch is not acknowledged."""

from __future__ import annotations

from typing import Any

import pytest

from synpref.services.controller.executors import KafkaExecutor
from synpref.shared.config import Settings, TopicSettings
from synpref.shared.kafka import clients
from synpref.shared.kafka.clients import DeliveryError
from synpref.shared.pairs import new_pair, new_record


class Refused:
    is_done = True
    exception = RuntimeError("NotEnoughReplicas")

    def failed(self) -> bool:
        return True


class RefusingProducer:
    def __init__(self) -> None:
        self.closed = False

    def send(self, topic: str, key: Any, value: bytes, headers: Any) -> Refused:
        return Refused()

    def flush(self, timeout: float) -> None:
        return None

    def close(self) -> None:
        self.closed = True


class IdleConsumer:
    polls = 0

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, parts: Any) -> None: ...

    def seek_to_end(self, *parts: Any) -> None: ...

    def position(self, tp: Any, timeout_ms: int | None = None) -> int:
        return 0

    def poll(self, timeout_ms: int) -> dict:
        IdleConsumer.polls += 1
        return {}

    def close(self) -> None: ...


def test_an_unacknowledged_publish_raises_instead_of_waiting_for_results(monkeypatch: pytest.MonkeyPatch) -> None:
    producer = RefusingProducer()
    monkeypatch.setattr(clients, "make_producer", lambda kafka: producer)
    monkeypatch.setattr(clients, "make_consumer", lambda kafka, group, **kw: IdleConsumer())
    pair = new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                    [{"role": "assistant", "content": "b"}], source="unit")  # fmt: skip
    executor = KafkaExecutor(Settings(topics=TopicSettings(s1_raw="in")), timeout_s=30)
    with pytest.raises(DeliveryError, match="1 of 1 messages not acknowledged"):
        executor.run("stage1", [new_record(pair)])
    assert IdleConsumer.polls == 0, "no wait for results of a batch that was never published"
    assert producer.closed


class Broker:
    """Topics as lists of messages, and a desk that answers one review message per consumer poll."""

    def __init__(self) -> None:
        from collections import defaultdict

        self.topics: dict[str, list[Any]] = defaultdict(list)
        self.answered = 0
        self.asked: list[str] = []

    def desk_answers_one(self, topics: TopicSettings) -> None:
        from types import SimpleNamespace

        from synpref.services.controller.state import key_of
        from synpref.services.desk.core import decide
        from synpref.shared.kafka.codec import decode_record, encode_record
        from synpref.v1.pair_pb2 import PREFERENCE_CHOSEN, HumanVerdict

        review = self.topics[topics.review]
        if self.answered < len(review):
            msg = review[self.answered]
            self.answered += 1
            record = decode_record(msg.value, msg.headers)
            self.asked.append(key_of(record))
            route, out = decide(record, [HumanVerdict(annotator="a", preference=PREFERENCE_CHOSEN)])
            sent = encode_record(out, getattr(topics, route))
            self.topics[sent.topic].append(SimpleNamespace(value=sent.value, headers=sent.headers))


class Acked:
    is_done = True
    exception = None

    def failed(self) -> bool:
        return False


class BrokerProducer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def send(self, topic: str, key: Any, value: bytes, headers: Any) -> Acked:
        from types import SimpleNamespace

        self.broker.topics[topic].append(SimpleNamespace(value=value, headers=headers))
        return Acked()

    def flush(self, timeout: float) -> None: ...

    def close(self) -> None: ...


class BrokerConsumer:
    def __init__(self, broker: Broker, topics: TopicSettings, die_on_poll: int = 0) -> None:
        self.broker, self.settings, self.die_on_poll, self.polls = broker, topics, die_on_poll, 0
        self.pos: dict[Any, int] = {}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, parts: Any) -> None:
        self.pos = dict.fromkeys(parts, 0)

    def seek_to_end(self, *parts: Any) -> None:
        for tp in parts:
            self.pos[tp] = len(self.broker.topics[tp.topic])

    def seek(self, tp: Any, offset: int) -> None:
        self.pos[tp] = offset

    def position(self, tp: Any, timeout_ms: int | None = None) -> int:
        return self.pos[tp]

    def poll(self, timeout_ms: int) -> dict:
        self.polls += 1
        if self.polls == self.die_on_poll:
            raise RuntimeError("controller killed while it waits for the desk")
        self.broker.desk_answers_one(self.settings)
        out = {}
        for tp, at in self.pos.items():
            out[tp] = self.broker.topics[tp.topic][at:]
            self.pos[tp] = len(self.broker.topics[tp.topic])
        return out

    def close(self) -> None: ...


def test_a_restarted_review_reads_back_the_desks_decisions_and_republishes_nothing(monkeypatch, tmp_path) -> None:
    # The controller dies while the desk works through its pairs; the desk answers one more while no
    # controller listens. The retried step reuses the verdict it had kept, reads the one written
    # meanwhile from the topic, publishes nothing again, and no pair reaches the desk twice.
    from synpref.services.controller.providers import KafkaDeskHumans
    from synpref.services.controller.state import VerdictLog, key_of, review_once

    topics = TopicSettings()
    broker = Broker()
    consumers = iter([BrokerConsumer(broker, topics, die_on_poll=2), BrokerConsumer(broker, topics)])
    monkeypatch.setattr(clients, "make_producer", lambda kafka: BrokerProducer(broker))
    monkeypatch.setattr(clients, "make_consumer", lambda kafka, group, **kw: next(consumers))
    records = []
    for i in range(3):
        pair = new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                        [{"role": "assistant", "content": "b"}], source="unit")  # fmt: skip
        records.append(new_record(pair))
    log = VerdictLog(tmp_path / "verdicts.sqlite")
    humans = KafkaDeskHumans(Settings(topics=topics), timeout_s=30)
    with pytest.raises(RuntimeError, match="killed"):
        review_once(humans, log, "s1.1.curate", records, lambda _m: None)
    assert len(log.recorded("s1.1.curate", records)) == 1, "the verdict consumed before the kill was kept"
    broker.desk_answers_one(topics)  # while no controller listens
    routed = review_once(KafkaDeskHumans(Settings(topics=topics), timeout_s=30), log, "s1.1.curate", records, print)
    assert [key_of(r) for _, r in routed] == [key_of(r) for r in records]
    assert [route for route, _ in routed] == ["verified"] * 3
    assert len(broker.topics[topics.review]) == 3, "nothing published twice"
    assert sorted(broker.asked) == sorted(key_of(r) for r in records), "no pair reached the desk twice"
