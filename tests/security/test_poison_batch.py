"""Issue 12, item 4: one bad record must not send its whole batch to the dead-letter topic.

Five valid pairs, one record with only an id and one with a role no chat has, in one batch
to a real gold-scorer process: before the fix all seven landed in the dead-letter topic
with the same reason. Only the two bad ones may, each with its own reason.
"""

from __future__ import annotations

from typing import Any

import pytest
from kafka_broker import produce, read_topic
from synpref_procs import Proc, watch_alive, write_config

from synpref.shared.kafka.codec import DLQ_KIND, DLQ_REASON, decode_record, header_map
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord
from testing.tiny import build_tiny_reward_model

pytestmark = pytest.mark.integration


def pair(i: int, user_role: str = "user") -> PairRecord:
    return new_record(
        new_pair(
            [{"role": user_role, "content": f"question {i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="security",
        )
    )


def test_only_the_bad_records_of_a_batch_are_dead_lettered(
    kafka_settings: Any, unique_topics: Any, unique_group: Any, tmp_path: Any
) -> None:
    kafka = kafka_settings.kafka
    topics = unique_topics(partitions=1)
    valid = [pair(i) for i in range(5)]
    id_only = PairRecord()
    id_only.pair.id = "only-an-id"
    bad_role = pair(99, user_role="hacker")
    # Published before the service starts, so its first poll takes all seven as one batch.
    produce(kafka, topics.s2_raw, [*valid[:2], id_only, *valid[2:4], bad_role, valid[4]])
    gold = build_tiny_reward_model(tmp_path / "gold", layers=1, hidden=32, heads=2, kv_heads=1, seed=1)
    config = write_config(
        tmp_path / "config.yaml", kafka.bootstrap_servers, topics,
        kafka={"max_batch": 64}, service={"group_id": unique_group()},
        scoring={"gold": {"path": str(gold), "version": "g1"}, "max_length": 128},
    )  # fmt: skip
    scorer = Proc("gold-scorer", ["gold-scorer"], config, tmp_path).start()
    try:
        scorer.wait_ready(180)
        scored: list = []
        dead: list = []

        def all_out() -> bool:
            scored[:] = read_topic(kafka, topics.s2_scored)
            dead[:] = read_topic(kafka, topics.dead_letter)
            return len(scored) + len(dead) >= 7

        watch_alive(scorer, all_out, 120, "all seven records scored or dead-lettered")
        assert sorted(decode_record(m.value, m.headers).pair.id for m in scored) == sorted(r.pair.id for r in valid)
        reasons = {m.key.decode(): header_map(m.headers) for m in dead}
        assert sorted(reasons) == sorted(["only-an-id", bad_role.pair.id])
        assert "hacker" in reasons[bad_role.pair.id][DLQ_REASON]
        assert reasons["only-an-id"][DLQ_REASON] != reasons[bad_role.pair.id][DLQ_REASON]
        assert {h[DLQ_KIND] for h in reasons.values()} <= {"failed", "stage-error"}
    finally:
        code = scorer.stop()
    assert code == 0, scorer.text()[-3000:]
