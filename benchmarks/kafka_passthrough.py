"""Pass-through throughput over Kafka on loopback: pairs/s for one stage, one and two consumers.

Each consumer is a `synpref passthrough` process (the real service: decode, stage, produce
with acks=all, flush, commit). The input is pre-loaded into a 3-partition topic; the clock
runs from the first output message to the last, so process start and group join are
reported separately instead of diluting the rate. Pairs are real hh-rlhf harmless-base
test pairs from ../shared/data (cycled to --pairs), or synthetic ones when that is absent.

    .venv/bin/python benchmarks/kafka_passthrough.py [--pairs 40000] [--consumers 1 2]

Uses SYNPREF_KAFKA_BOOTSTRAP when set, else starts a LocalKafka for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from synpref.shared.config import KafkaSettings
from synpref.shared.kafka.admin import ensure_topics
from synpref.shared.kafka.clients import make_producer
from synpref.shared.kafka.codec import encode_record
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord

REPO = Path(__file__).resolve().parents[1]
# testing/ (the local broker, the pass-through service: test support, not installed) lives at the repo root.
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
MARK = "\n\nAssistant:"


def hh_turns(text: str) -> list[dict[str, str]]:
    turns = []
    for chunk in text.split("\n\nHuman:")[1:]:
        human, _, assistant = chunk.partition(MARK)
        turns.append({"role": "user", "content": human.strip()})
        if assistant:
            turns.append({"role": "assistant", "content": assistant.strip()})
    return turns


def load_pairs(n: int) -> tuple[list[PairRecord], str]:
    base: list[PairRecord] = []
    if HH.exists():
        with gzip.open(HH, "rt") as fh:
            for line in fh:
                row = json.loads(line)
                cut_c, cut_r = row["chosen"].rfind(MARK), row["rejected"].rfind(MARK)
                prefix = row["chosen"][:cut_c]
                if prefix != row["rejected"][:cut_r]:
                    continue
                base.append(
                    new_record(
                        new_pair(
                            hh_turns(prefix),
                            [{"role": "assistant", "content": row["chosen"][cut_c + len(MARK) :].strip()}],
                            [{"role": "assistant", "content": row["rejected"][cut_r + len(MARK) :].strip()}],
                            source="hh-rlhf/harmless-base",
                        )
                    )
                )
        origin = f"hh-rlhf harmless-base test ({len(base)} pairs, cycled)"
    else:
        for i in range(1000):
            base.append(
                new_record(
                    new_pair(
                        [{"role": "user", "content": f"question {i} " * 20}],
                        [{"role": "assistant", "content": f"a careful answer {i} " * 30}],
                        [{"role": "assistant", "content": f"a sloppy answer {i} " * 30}],
                        source="synthetic",
                    )
                )
            )
        origin = "synthetic (../shared/data not found)"
    return [base[i % len(base)] for i in range(n)], origin


def topic_size(consumer: KafkaConsumer, topic: str, partitions: int) -> int:
    return sum(consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)]).values())


def preload(kafka: KafkaSettings, topic: str, records: list[PairRecord]) -> tuple[float, int]:
    producer = make_producer(kafka)
    started = time.perf_counter()
    size = 0
    for record in records:
        out = encode_record(record, topic)
        size += len(out.value)
        producer.send(out.topic, key=out.key, value=out.value, headers=out.headers)
    producer.flush(timeout=300)
    seconds = time.perf_counter() - started
    producer.close()
    return seconds, size


def run_consumers(kafka: KafkaSettings, raw: str, n: int, consumers: int, workdir: Path) -> dict[str, float]:
    out_topic = f"bench-out-{uuid.uuid4().hex[:8]}"
    # The pass-through reads both stages' raw topics: Stage 1's is an empty one of its own.
    ensure_topics(kafka, [out_topic, f"{out_topic}.dlq", f"{out_topic}.s1"], partitions=3, replication_factor=1)
    env = {
        **os.environ,
        "SYNPREF_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SYNPREF_TOPICS__S1_RAW": f"{out_topic}.s1",
        "SYNPREF_TOPICS__S2_RAW": raw,
        "SYNPREF_TOPICS__S2_ANNOTATED": out_topic,
        "SYNPREF_TOPICS__DEAD_LETTER": f"{out_topic}.dlq",
        "SYNPREF_SERVICE__GROUP_ID": f"bench-{uuid.uuid4().hex[:8]}",
        "SYNPREF_SERVICE__HOST": "127.0.0.1",
        "SYNPREF_SERVICE__GRPC_PORT": "0",
        "SYNPREF_SERVICE__METRICS_PORT": "0",
        "SYNPREF_SERVICE__SHUTDOWN_GRACE_S": "1",
        "SYNPREF_LOG_LEVEL": "WARNING",
    }
    launched = time.perf_counter()
    procs = []
    for i in range(consumers):
        log = (workdir / f"consumer-{consumers}-{i}.log").open("wb")
        cmd = [sys.executable, "-m", "testing.passthrough"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    first = last = None
    deadline = time.monotonic() + 600
    # One watcher connection for the whole run: a new client per check would steal CPU from the consumers.
    watcher = KafkaConsumer(**kafka.client_kwargs(), group_id=None)
    try:
        while time.monotonic() < deadline:
            done = topic_size(watcher, out_topic, 3)
            now = time.perf_counter()
            if done and first is None:
                first, first_count = now, done
            if done >= n:
                last = now
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a consumer exited early; see {workdir}")
            time.sleep(0.1)
    finally:
        watcher.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    if first is None or last is None:
        raise RuntimeError(f"{consumers} consumer(s) did not finish {n} pairs in 600 s; see {workdir}")
    return {
        "startup_s": first - launched,
        "drain_s": last - first,
        "pairs_per_s": (n - first_count) / max(last - first, 1e-9),
        "end_to_end_pairs_per_s": n / (last - launched),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=40_000)
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    records, origin = load_pairs(args.pairs)
    with contextlib.ExitStack() as stack:
        external = os.environ.get("SYNPREF_KAFKA_BOOTSTRAP")
        if external:
            bootstrap, broker = external, f"Kafka cluster at {external}"
        else:
            from testing.local_kafka import LocalKafka

            local = stack.enter_context(LocalKafka())
            bootstrap, broker = local.bootstrap_servers, local.describe()
        kafka = KafkaSettings(bootstrap_servers=bootstrap)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-kafka-")))
        raw = f"bench-raw-{uuid.uuid4().hex[:8]}"
        ensure_topics(kafka, [raw], partitions=3, replication_factor=1)
        produce_s, size = preload(kafka, raw, records)

        print(f"broker: {broker}; input: {args.pairs} pairs from {origin}, 3 partitions")
        print(f"payload: {size / args.pairs:.0f} B/pair on average; max_batch {KafkaSettings().max_batch}; acks=all")
        print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
        print(f"preload (one producer, acks=all, idempotent): {args.pairs / produce_s:,.0f} pairs/s")
        for consumers in args.consumers:
            r = run_consumers(kafka, raw, args.pairs, consumers, workdir)
            print(
                f"pass-through, {consumers} consumer process(es): {r['pairs_per_s']:,.0f} pairs/s steady "
                f"(drain {r['drain_s']:.1f} s after first output; start+join {r['startup_s']:.1f} s; "
                f"{r['end_to_end_pairs_per_s']:,.0f} pairs/s end to end)"
            )
        print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
