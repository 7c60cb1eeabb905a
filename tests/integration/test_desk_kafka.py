"""The desk's Kafka backend on a real broker: routing, dead letters, and at-least-once restarts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kafka_broker import produce, read_topic

from synpref.services.desk import ReviewDesk
from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.shared.config import DeskSettings
from synpref.shared.kafka.clients import make_producer
from synpref.shared.kafka.codec import DLQ_KIND, decode_record, header_map
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import Decision, PairRecord

pytestmark = pytest.mark.integration
TOKENS = {"a": "a-token-0123456789abcdef-ghijklmn"}


def record(i: int) -> PairRecord:
    return new_record(
        new_pair(
            [{"role": "user", "content": f"q{i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="kafka-test",
        )
    )


async def fill(desk: ReviewDesk, want: int) -> None:
    # The first polls may come back empty while the consumer joins its group.
    for _ in range(60):
        await desk.refill()
        if desk.core.pending >= want:
            return
    raise AssertionError(f"desk holds {desk.core.pending} pairs, wanted {want}")


def test_restart_redelivers_only_undecided_pairs(kafka_settings: Any, unique_topics: Any, unique_group: Any) -> None:
    topics = unique_topics(partitions=1)
    kafka = kafka_settings.kafka
    garbage = make_producer(kafka)
    garbage.send(topics.review, key=b"junk", value=b"not a protobuf").get(timeout=30)
    garbage.close(timeout=10)
    recs = [record(i) for i in range(3)]
    produce(kafka, topics.review, recs)
    group = unique_group()

    async def first_desk() -> dict[int, int | None]:
        queues = KafkaDeskQueues(kafka, topics, group)
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        await fill(desk, 3)
        entry = desk.core.next_for("a")
        assert entry is not None and entry.pair_id == recs[0].pair.id
        assert await desk.submit("a", entry.pair_id, 0, "no idea") is True
        # The next pair is assigned but never answered: the desk then stops.
        entry = desk.core.next_for("a")
        assert entry is not None and entry.pair_id == recs[1].pair.id
        committed = await queues.committed()
        await desk.close()
        return committed

    async def second_desk() -> tuple[list[str], dict[int, int | None]]:
        queues = KafkaDeskQueues(kafka, topics, group)
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        await fill(desk, 2)
        await desk.refill()
        seen = []
        for choice in (1, 2):
            entry = desk.core.next_for("a")
            assert entry is not None
            seen.append(entry.pair_id)
            assert await desk.submit("a", entry.pair_id, choice, "") is True
        assert desk.core.next_for("a") is None
        committed = await queues.committed()
        await desk.close()
        return seen, committed

    # offset 0 is the junk (dead-lettered, settled), 1 decided: the group resumes at 2.
    assert asyncio.run(first_desk()) == {0: 2}
    seen, committed = asyncio.run(second_desk())
    assert seen == [recs[1].pair.id, recs[2].pair.id]
    assert committed == {0: 4}

    discarded = [decode_record(m.value, m.headers) for m in read_topic(kafka, topics.discarded, expect=1)]
    assert [r.lineage.original_id or r.pair.id for r in discarded] == [recs[0].pair.id]
    assert discarded[0].decision.decision == Decision.DECISION_DISCARD
    assert discarded[0].human_verdicts[0].note == "no idea"
    verified = [decode_record(m.value, m.headers) for m in read_topic(kafka, topics.verified, expect=2)]
    assert sorted(r.lineage.original_id or r.pair.id for r in verified) == sorted(p.pair.id for p in recs[1:])
    assert all(r.human_verdicts[0].annotator == "a" for r in verified)
    dlq = read_topic(kafka, topics.dead_letter, expect=1)
    assert len(dlq) == 1 and dlq[0].value == b"not a protobuf"
    assert header_map(dlq[0].headers)[DLQ_KIND] == "undecodable"


def test_synpref_desk_command_serves_and_stops_on_sigterm(
    kafka_settings: Any, unique_topics: Any, unique_group: Any, tmp_path: Any
) -> None:
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    topics = unique_topics(partitions=1)
    kafka = kafka_settings.kafka
    produce(kafka, topics.review, [record(42)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "tokens").write_text("a:a-token-0123456789abcdef-ghijklmn\n")
    env = {
        **os.environ,
        "SYNPREF_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SYNPREF_TOPICS__REVIEW": topics.review,
        "SYNPREF_TOPICS__VERIFIED": topics.verified,
        "SYNPREF_TOPICS__DISCARDED": topics.discarded,
        "SYNPREF_TOPICS__DEAD_LETTER": topics.dead_letter,
        "SYNPREF_DESK__GROUP_ID": unique_group(),
    }
    cmd = [
        sys.executable,
        "-m",
        "synpref.shared.cli",
        "desk",
        "--port",
        str(port),
        "--tokens-file",
        str(tmp_path / "tokens"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, token: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        for _ in range(100):
            try:
                if get("/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert get("/api/next")[0] == 401
        pair = None
        for _ in range(50):
            status, body = get("/api/next", TOKENS["a"])
            assert status == 200
            if body["pair"] is not None:
                pair = body["pair"]
                break
            time.sleep(0.2)
        assert pair is not None and pair["pair_id"] == record(42).pair.id
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_a_full_desk_stops_reading_and_resumes(kafka_settings: Any, unique_topics: Any, unique_group: Any) -> None:
    topics = unique_topics(partitions=1)
    kafka = kafka_settings.kafka
    recs = [record(100 + i) for i in range(3)]
    produce(kafka, topics.review, recs)

    async def scenario() -> list[str]:
        queues = KafkaDeskQueues(kafka, topics, unique_group())
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(max_pending=1), tokens=TOKENS)
        order = []
        for _ in range(3):
            await fill(desk, 1)
            for _ in range(5):
                await desk.refill()  # full: fetch(0) keeps the consumer alive but takes nothing
            assert desk.core.pending == 1
            entry = desk.core.next_for("a")
            assert entry is not None
            order.append(entry.pair_id)
            assert await desk.submit("a", entry.pair_id, 1, "") is True
        assert await queues.committed() == {0: 3}
        await desk.close()
        return order

    assert asyncio.run(scenario()) == [r.pair.id for r in recs]
    assert len(read_topic(kafka, topics.verified, expect=3)) == 3
