"""The controller's Kafka executor raises when its published batch is not acknowledged."""

from __future__ import annotations

import pytest
from kafka.errors import NotEnoughReplicasError

from synpref.services.controller.executors import KafkaExecutor
from synpref.shared.config import Settings, TopicSettings
from synpref.shared.kafka import clients
from synpref.shared.kafka.clients import DeliveryError
from synpref.shared.pairs import new_pair, new_record
from testing.group_consumer import RecordingProducer, Topics, TopicsConsumer


def test_an_unacknowledged_publish_raises_instead_of_waiting_for_results(monkeypatch: pytest.MonkeyPatch) -> None:
    producer = RecordingProducer(fail=lambda topic, key: NotEnoughReplicasError())
    consumer = TopicsConsumer(Topics())
    monkeypatch.setattr(clients, "make_producer", lambda kafka: producer)
    monkeypatch.setattr(clients, "make_consumer", lambda kafka, group, **kw: consumer)
    pair = new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                    [{"role": "assistant", "content": "b"}], source="unit")  # fmt: skip
    executor = KafkaExecutor(Settings(topics=TopicSettings(s1_raw="in")), timeout_s=30)
    with pytest.raises(DeliveryError, match="1 of 1 messages not acknowledged"):
        executor.run("stage1", [new_record(pair)])
    assert consumer.polls == 0, "no wait for results of a batch that was never published"
    assert producer.closed


class Broker(Topics):
    """Topics, and a desk that answers one review message per consumer poll."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = 0
        self.asked: list[str] = []

    def desk_answers_one(self, topics: TopicSettings) -> None:
        from synpref.services.controller.state import key_of
        from synpref.services.desk.core import decide
        from synpref.shared.kafka.codec import decode_record, encode_record
        from synpref.v1.pair_pb2 import PREFERENCE_CHOSEN, HumanVerdict

        review = self.messages(topics.review)
        if self.answered < len(review):
            msg = review[self.answered]
            self.answered += 1
            record = decode_record(msg.value, msg.headers)
            self.asked.append(key_of(record))
            route, out = decide(record, [HumanVerdict(annotator="a", preference=PREFERENCE_CHOSEN)])
            sent = encode_record(out, getattr(topics, route))
            self.append(sent.topic, sent.key, sent.value, sent.headers)

    def consumer(self, topics: TopicSettings, die_on_poll: int = 0) -> TopicsConsumer:
        """A consumer during whose polls the desk answers; poll number `die_on_poll` raises instead."""

        def desk(poll: int) -> None:
            if poll == die_on_poll:
                raise RuntimeError("controller killed while it waits for the desk")
            self.desk_answers_one(topics)

        return TopicsConsumer(self, desk)


def test_a_restarted_review_reads_back_the_desks_decisions_and_republishes_nothing(monkeypatch, tmp_path) -> None:
    # The controller dies while the desk works through its pairs; the desk answers one more while no
    # controller listens. The retried step reuses the verdict it had kept, reads the one written
    # meanwhile from the topic, publishes nothing again, and no pair reaches the desk twice.
    from synpref.services.controller.providers import KafkaDeskHumans
    from synpref.services.controller.state import VerdictLog, key_of, review_once

    topics = TopicSettings()
    broker = Broker()
    consumers = iter([broker.consumer(topics, die_on_poll=2), broker.consumer(topics)])
    monkeypatch.setattr(clients, "make_producer", lambda kafka: RecordingProducer(broker))
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
    assert len(broker.messages(topics.review)) == 3, "nothing published twice"
    assert sorted(broker.asked) == sorted(key_of(r) for r in records), "no pair reached the desk twice"
