"""Review 43: a desk restart labels a pair again and, disagreeing, publishes a FLIPPED copy (a new pair id) beside
the first verdict on the verified topic. The controller's D_gold must still hold that comparison once.

The controller matches the desk's records to the pairs it asked by key (lineage.original_id, which `flipped` keeps),
not by pair id, so both orientations land on the same PairStore row and the first verdict consumed is the one kept
(state.VerdictLog pins it for a retried step). These tests pin that guarantee through the real KafkaDeskHumans,
review_once, Controller.ask_humans and PairStore, with a list-backed broker (one partition per topic, or one per
pair id as the codec's message key spreads them).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.structs import TopicPartition

from synpref.services.controller import loop
from synpref.services.controller.providers import KafkaDeskHumans
from synpref.services.controller.state import VerdictLog, key_of
from synpref.services.desk.core import decide
from synpref.shared.config import Settings, TopicSettings
from synpref.shared.kafka import clients
from synpref.shared.kafka.codec import decode_record, encode_record
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.pairstore import PairStore
from synpref.v1.pair_pb2 import (
    DECISION_FLIP,
    DECISION_KEEP,
    PREFERENCE_CHOSEN,
    PREFERENCE_REJECTED,
    HumanVerdict,
    PairRecord,
)
from testing.group_consumer import RecordingProducer, Topics, TopicsConsumer

TOPICS = TopicSettings()
PARTS = 3


class Broker(Topics):
    """Topics of PARTS partitions; a message goes to the partition of its key (the pair id), as Kafka's does."""

    def __init__(self) -> None:
        super().__init__(PARTS)

    def desk_labels(self, *prefs: int) -> None:
        """The desk labels every pair of the review topic once per preference given: a second one is a desk that
        restarted below its committed offset and showed the pair again."""
        for msg in self.messages(TOPICS.review):
            record = decode_record(msg.value, msg.headers)
            for pref in prefs:
                route, out = decide(record, [HumanVerdict(annotator="a", preference=pref)])  # type: ignore[arg-type]
                sent = encode_record(out, getattr(TOPICS, route))
                self.append(sent.topic, sent.key, sent.value, sent.headers)


def consumer(broker: Broker, desk: Any = None, reverse: bool = False) -> TopicsConsumer:
    """Reads its assigned partitions; `desk` runs at the first poll (the humans answering meanwhile); `reverse` hands
    partitions over in the other order (which orientation comes first is up to the broker)."""
    return TopicsConsumer(broker, lambda poll: desk() if desk is not None and poll == 1 else None, reverse)


class Dying(TopicsConsumer):
    """The first poll hands over one message and the next one raises (the controller killed)."""

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None, update_offsets: bool = True
    ) -> dict[TopicPartition, list[Any]]:
        if self.polls:
            raise RuntimeError("controller killed while it waits for the desk")
        return super().poll(timeout_ms, 1, update_offsets)


def records(n: int) -> list[PairRecord]:
    out = []
    for i in range(n):
        pair = new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"good {i}"}],
                        [{"role": "assistant", "content": f"bad {i}"}], source="review43")  # fmt: skip
        out.append(new_record(pair))
    return out


def controller(tmp_path: Path, store: PairStore, humans: Any) -> Any:
    """The attributes Controller.ask_humans uses, around the real PairStore and VerdictLog."""
    return SimpleNamespace(
        pairstore=store,
        humans=humans,
        verdicts=VerdictLog(tmp_path / "verdicts.sqlite"),
        current_step="seed",
        say=lambda _m: None,
        left_unverified=lambda _rows: None,
        refresh_examples=lambda: None,
    )


@pytest.mark.parametrize("reverse", [False, True], ids=["kept-first", "flipped-first"])
def test_a_pair_the_desk_labels_twice_the_other_way_round_is_in_d_gold_once(monkeypatch, tmp_path, reverse) -> None:
    broker = Broker()
    monkeypatch.setattr(clients, "make_producer", lambda kafka: RecordingProducer(broker))
    desk = lambda: broker.desk_labels(PREFERENCE_CHOSEN, PREFERENCE_REJECTED)  # noqa: E731
    monkeypatch.setattr(clients, "make_consumer", lambda kafka, group, **kw: consumer(broker, desk, reverse))
    asked = records(4)
    with PairStore(tmp_path / "pairs.sqlite") as store:
        store.add((key_of(r), "unverified", r) for r in asked)
        rows = sorted(store.rows_of([key_of(r) for r in asked]).values())
        c = controller(tmp_path, store, KafkaDeskHumans(Settings(topics=TOPICS), timeout_s=30))
        verified, dropped = loop.Controller.ask_humans(c, rows, 0)
        # Both orientations of every pair are on the verified topic (the duplicate the suspect describes) ...
        on_topic = [decode_record(m.value, m.headers) for m in broker.messages(TOPICS.verified)]
        assert len(on_topic) == 2 * len(asked)
        assert len({r.pair.id for r in on_topic}) == 2 * len(asked)
        # ... and D_gold holds each comparison once, under its ingest key, in one orientation.
        assert sorted(verified) == rows and dropped == []
        assert store.counts()["gold"] == len(asked) == store.size()
        gold = store.records_by_key()
        assert set(gold) == {key_of(r) for r in asked}
        for r in asked:
            got = gold[key_of(r)]
            assert {got.decision.decision} <= {DECISION_KEEP, DECISION_FLIP}
            assert len(got.human_verdicts) == 1, "one labelling, not both merged"
        if reverse:  # these pairs' flipped copies sit in partitions read first: the scenario is exercised
            assert any(g.decision.decision == DECISION_FLIP for g in gold.values())
        # The verdict kept is the one the VerdictLog holds, so a retried step ends the same way.
        log = c.verdicts.recorded("seed", asked)
        assert {k: rec.pair.id for k, (_route, rec) in log.items()} == {k: v.pair.id for k, v in gold.items()}
        c.verdicts.close()


def test_a_retried_step_keeps_the_verdict_it_recorded_when_the_desk_answers_again_the_other_way(
    monkeypatch, tmp_path
) -> None:
    # The controller dies after it kept the desk's first verdict on one pair; the desk restarts and publishes a
    # flipped copy of every pair; the retried step reads the topics back from where the first attempt started.
    broker = Broker()
    monkeypatch.setattr(clients, "make_producer", lambda kafka: RecordingProducer(broker))
    first = Dying(broker, lambda poll: broker.desk_labels(PREFERENCE_CHOSEN))
    consumers = iter([first, consumer(broker)])
    monkeypatch.setattr(clients, "make_consumer", lambda kafka, group, **kw: next(consumers))
    asked = records(3)
    with PairStore(tmp_path / "pairs.sqlite") as store:
        store.add((key_of(r), "unverified", r) for r in asked)
        rows = sorted(store.rows_of([key_of(r) for r in asked]).values())
        c = controller(tmp_path, store, KafkaDeskHumans(Settings(topics=TOPICS), timeout_s=30))
        with pytest.raises(RuntimeError, match="killed"):
            loop.Controller.ask_humans(c, rows, 0)
        first = c.verdicts.recorded("seed", asked)
        assert len(first) == 1, "one verdict consumed and kept before the kill"
        broker.desk_labels(PREFERENCE_REJECTED)  # the restarted desk, while no controller listens
        verified, _dropped = loop.Controller.ask_humans(c, rows, 0)
        assert sorted(verified) == rows
        assert store.counts()["gold"] == len(asked) == store.size()
        gold = store.records_by_key()
        for key, (_route, kept) in first.items():
            assert gold[key].pair.id == kept.pair.id and gold[key].decision.decision == DECISION_KEEP
        log = c.verdicts.recorded("seed", asked)
        assert {k: rec.pair.id for k, (_route, rec) in log.items()} == {k: v.pair.id for k, v in gold.items()}
        c.verdicts.close()
