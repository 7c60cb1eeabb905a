"""Acceptance: 10,000 pairs through the pass-through service (testing/passthrough.py) run as 2 consumer processes in one
group over a 3-partition topic, with a corrupt message and a SIGTERM + restart mid-stream.

At-least-once: duplicates are allowed (and counted), a missing pair is a failure.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka_broker import produce, read_topic, topic_size

from synpref.shared.kafka.clients import make_producer
from synpref.shared.kafka.codec import DLQ_KIND, DLQ_REASON, DLQ_SERVICE, DLQ_TOPIC, decode_record, header_map
from synpref.shared.pairs import new_pair, new_record
from testing import REPO_ROOT
from testing.wait import wait_until

pytestmark = pytest.mark.integration

N = 10_000


class Consumer:
    """One pass-through service process, its output in files (a full pipe would block it)."""

    def __init__(self, name: str, env: dict[str, str], folder: Path) -> None:
        self.name = name
        self.log = folder / f"{name}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "testing.passthrough"],
                env={**env, "PYTHONPATH": str(REPO_ROOT)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "passthrough ready:" not in self.text():
            assert self.process.poll() is None, f"{self.name} exited early:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name} not ready in {timeout_s} s:\n{self.text()[-3000:]}"
            time.sleep(0.1)

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout_s} s:\n{self.text()[-3000:]}") from None


def feed(kafka, topic, records, producer) -> None:
    """Produce in chunks with short pauses: a stream, not one burst."""
    for i in range(0, len(records), 250):
        produce(kafka, topic, records[i : i + 250], producer=producer)
        time.sleep(0.05)


def processed(consumer: Consumer) -> int:
    """Input messages a stopped consumer handled, from its closing log line."""
    found = re.search(r"stopped after \{'processed': (\d+)", consumer.text())
    assert found, f"{consumer.name} logged no closing line:\n{consumer.text()[-3000:]}"
    return int(found.group(1))


@pytest.mark.slow  # about 25 s: 10,000 pairs, three service processes
def test_ten_thousand_pairs_two_processes_corrupt_message_and_sigterm(
    kafka_settings, unique_topics, unique_group, tmp_path
):
    topics = unique_topics(partitions=3)
    kafka = kafka_settings.kafka
    records = [
        new_record(
            new_pair(
                [{"role": "user", "content": f"prompt {i}"}],
                [{"role": "assistant", "content": f"chosen {i}"}],
                [{"role": "assistant", "content": f"rejected {i}"}],
                source="acceptance",
            )
        )
        for i in range(N)
    ]
    expected = {r.pair.id for r in records}
    assert len(expected) == N

    # First half, with a corrupt message in the middle of it: what follows it must still flow.
    producer = make_producer(kafka)
    produce(kafka, topics.s2_raw, records[:2500], producer=producer)
    producer.send(topics.s2_raw, key=b"corrupt", value=b"\x0a\xff\xff\xff garbage", headers=[("synpref-schema", b"v1")])
    produce(kafka, topics.s2_raw, records[2500:5000], producer=producer)

    env = {
        **os.environ,
        "SYNPREF_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SYNPREF_KAFKA__MAX_BATCH": "200",
        # The pass-through reads both stages' raw topics; unstaged records go to Stage 2's.
        "SYNPREF_TOPICS__S1_RAW": topics.s1_raw,
        "SYNPREF_TOPICS__S2_RAW": topics.s2_raw,
        "SYNPREF_TOPICS__S2_ANNOTATED": topics.s2_annotated,
        "SYNPREF_TOPICS__DEAD_LETTER": topics.dead_letter,
        "SYNPREF_SERVICE__GROUP_ID": unique_group(),
        "SYNPREF_SERVICE__HOST": "127.0.0.1",
        "SYNPREF_SERVICE__GRPC_PORT": "0",
        "SYNPREF_SERVICE__METRICS_PORT": "0",
        "SYNPREF_SERVICE__SHUTDOWN_GRACE_S": "1",
    }
    a = Consumer("a", env, tmp_path)
    b = Consumer("b", env, tmp_path)
    procs = [a, b]
    try:
        a.wait_ready()
        b.wait_ready()
        # Under load one consumer can win all partitions at first; SIGTERM only tests something
        # once the group has settled and a owns work.
        for proc in (a, b):
            wait_until(
                lambda p=proc: re.search(r"partitions assigned: \[\(", p.text()), 90, f"{proc.name} to own partitions"
            )
        wait_until(lambda: topic_size(kafka, topics.s2_annotated) >= 1000, 90, "the first 1,000 outputs")

        # More pairs stream in while consumer a is told to stop.
        feeder = threading.Thread(target=feed, args=(kafka, topics.s2_raw, records[5000:7500], producer), daemon=True)
        feeder.start()
        # 5,000 pairs and the corrupt message are in; stop a once the feeder's first chunk has landed too.
        wait_until(lambda: topic_size(kafka, topics.s2_raw) > 5001, 60, "the feeder's first chunk")
        assert a.terminate() == 0, a.text()[-3000:]
        assert processed(a) > 0, "consumer a stopped before it handled anything"
        feeder.join(timeout=120)
        assert not feeder.is_alive(), "producing took over 120 s"

        # The restarted consumer takes partitions back, then the rest streams in.
        a2 = Consumer("a2", env, tmp_path)
        procs.append(a2)
        a2.wait_ready()
        wait_until(lambda: re.search(r"partitions assigned: \[\(", a2.text()), 60, "a2 to be assigned partitions")
        feed(kafka, topics.s2_raw, records[7500:], producer)
        wait_until(lambda: topic_size(kafka, topics.s2_annotated) >= N, 120, f"{N} outputs")
        # A duplicate from a late rebalance is still counted: both stop gracefully (output flushed) before
        # the topic is read back.
        for proc in (a2, b):
            assert proc.terminate() == 0, proc.text()[-3000:]
    finally:
        producer.close(timeout=10)
        for proc in procs:
            if proc.process.poll() is None:
                proc.process.kill()
                proc.process.wait(timeout=10)

    out = read_topic(kafka, topics.s2_annotated)
    ids = Counter(decode_record(m.value, m.headers).pair.id for m in out)
    missing = expected - set(ids)
    duplicates = sum(ids.values()) - len(ids)
    handled = {proc.name: processed(proc) for proc in procs}
    print(f"\nacceptance: {N} in, {len(ids)} distinct out, {duplicates} duplicates, {len(missing)} missing; {handled}")
    assert not missing, f"{len(missing)} pairs missing"
    assert set(ids) == expected
    # Every input was handled once (the corrupt one included), plus once more for each duplicate.
    assert sum(handled.values()) == N + 1 + duplicates
    assert handled["a2"] > 0, "the restarted consumer never took part"

    (dead,) = read_topic(kafka, topics.dead_letter)
    found = header_map(dead.headers)
    assert dead.key == b"corrupt" and dead.value == b"\x0a\xff\xff\xff garbage"
    assert found[DLQ_KIND] == "undecodable" and found[DLQ_SERVICE] == "passthrough"
    assert found[DLQ_TOPIC] == topics.s2_raw and "not a synpref.v1.PairRecord protobuf" in found[DLQ_REASON]


@pytest.mark.slow  # about 20 s: two service processes and a 6 s session timeout
def test_sigkill_mid_stream_loses_nothing(kafka_settings, unique_topics, unique_group, tmp_path):
    """No graceful stop at all: what was produced but not committed is re-read, never lost."""
    topics = unique_topics(partitions=3)
    kafka = kafka_settings.kafka
    records = [
        new_record(
            new_pair(
                [{"role": "user", "content": f"kill {i}"}],
                [{"role": "assistant", "content": "yes"}],
                [{"role": "assistant", "content": "no"}],
                source="sigkill",
            )
        )
        for i in range(4000)
    ]
    env = {
        **os.environ,
        "SYNPREF_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SYNPREF_KAFKA__MAX_BATCH": "100",
        # The killed consumer never leaves the group: let the broker notice within 6 s, not 45.
        "SYNPREF_KAFKA__SESSION_TIMEOUT_MS": "6000",
        # The pass-through reads both stages' raw topics; unstaged records go to Stage 2's.
        "SYNPREF_TOPICS__S1_RAW": topics.s1_raw,
        "SYNPREF_TOPICS__S2_RAW": topics.s2_raw,
        "SYNPREF_TOPICS__S2_ANNOTATED": topics.s2_annotated,
        "SYNPREF_TOPICS__DEAD_LETTER": topics.dead_letter,
        "SYNPREF_SERVICE__GROUP_ID": unique_group(),
        "SYNPREF_SERVICE__HOST": "127.0.0.1",
        "SYNPREF_SERVICE__GRPC_PORT": "0",
        "SYNPREF_SERVICE__METRICS_PORT": "0",
        "SYNPREF_SERVICE__SHUTDOWN_GRACE_S": "1",
    }
    producer = make_producer(kafka)
    first = Consumer("first", env, tmp_path)
    procs = [first]
    try:
        first.wait_ready()
        feeder = threading.Thread(target=feed, args=(kafka, topics.s2_raw, records, producer), daemon=True)
        feeder.start()
        wait_until(lambda: topic_size(kafka, topics.s2_annotated) >= 500, 60, "the first 500 outputs")
        first.process.kill()
        first.process.wait(timeout=10)
        feeder.join(timeout=120)
        assert not feeder.is_alive(), "producing took over 120 s"
        second = Consumer("second", env, tmp_path)
        procs.append(second)
        second.wait_ready()
        wait_until(lambda: topic_size(kafka, topics.s2_annotated) >= len(records), 120, "every output")
        assert second.terminate() == 0, second.text()[-3000:]
    finally:
        producer.close(timeout=10)
        for proc in procs:
            if proc.process.poll() is None:
                proc.process.kill()
                proc.process.wait(timeout=10)
    ids = Counter(decode_record(m.value, m.headers).pair.id for m in read_topic(kafka, topics.s2_annotated))
    duplicates = sum(ids.values()) - len(ids)
    print(f"\nsigkill: {len(records)} in, {len(ids)} distinct out, {duplicates} duplicates")
    assert set(ids) == {r.pair.id for r in records}
    # Offsets are committed after every batch, so a kill re-delivers at most the one batch in flight.
    assert duplicates <= 100
