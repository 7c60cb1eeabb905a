"""Poison messages through every stage on a real local broker: nothing lost, nothing twice, no restarts.

Each stage service (annotator with the fake judge server of testing/fake_judges.py, gold-scorer
with two tiny random RMs, consistency filter, dataset writer) runs as its own `synpref`
process on its own topics and gets --records messages on its input topic: 1% malformed (half
not a protobuf at all, half a PairRecord the stage must refuse: a role no chat has, no gold
score, a DISCARD decision for the writer), 0.5% padded to within a few KB of the topic's
max.message.bytes, the rest ordinary pairs. Then, per stage: every good record arrives exactly
once (output topics, or dataset rows for the writer), every malformed one is in the DLQ with
a reason, every near-limit one has exactly one outcome (through, or DLQ'd as oversized), and
the process ran once and exits 0 on SIGTERM.

    .venv/bin/python benchmarks/poison_messages.py [--records 10000] [--stages annotator filter]

Uses SYNPREF_KAFKA_BOOTSTRAP when set, else starts a LocalKafka for the run. Exit status 0 = PASS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testing/ (broker, fake judges, tiny models) lives at the repo root

from synpref.services.ingest.main import topic_message_limit  # noqa: E402
from synpref.shared.config import KafkaSettings, TopicSettings  # noqa: E402
from synpref.shared.kafka.admin import ensure_topics  # noqa: E402
from synpref.shared.kafka.clients import make_producer  # noqa: E402
from synpref.shared.kafka.codec import DLQ_KIND, DLQ_REASON, encode_record, header_map, record_headers  # noqa: E402
from synpref.shared.pairs import new_pair, new_record  # noqa: E402
from synpref.v1.pair_pb2 import DECISION_DISCARD, DECISION_KEEP, PairRecord  # noqa: E402
from testing.local_kafka import free_port  # noqa: E402

STAGES = {  # stage -> (synpref command, input route, output routes; [] = dataset rows)
    "gold-scorer": ("gold-scorer", "s2_raw", ["s2_scored"]),
    "annotator": ("annotator", "s2_scored", ["s2_annotated"]),
    "filter": ("filter", "s2_annotated", ["s2_decided"]),
    "writer": ("writer", "curated", []),
}


def good(stage: str, i: int, pad: int = 0) -> PairRecord:
    record = new_record(
        new_pair(
            [{"role": "user", "content": f"question {i} for {stage}" + " filler" * (pad // 7)}],
            [{"role": "assistant", "content": f"a careful, complete answer {i}"}],
            [{"role": "assistant", "content": f"short {i}"}],
            source="poison-bench",
        )
    )
    if stage in ("filter", "writer"):
        for model, p in (("gold", 0.9), ("best", 0.8)):
            record.scores.add(model=model, version="bench", reward_chosen=1.0, reward_rejected=0.0, p=p)
    if stage == "writer":
        record.decision.decision = DECISION_KEEP
    return record


def refused(stage: str, i: int) -> PairRecord:
    """A well-formed PairRecord this stage must dead-letter."""
    record = good(stage, i)
    if stage in ("annotator", "gold-scorer"):
        bad = new_pair(
            [{"role": "villain", "content": f"q {i}"}],
            [{"role": "assistant", "content": "a"}],
            [{"role": "assistant", "content": "b"}],
            source="poison-bench",
        )
        record = new_record(bad)
    elif stage == "filter":
        del record.scores[:]  # no gold score: the rule cannot run
    else:
        record.decision.decision = DECISION_DISCARD
    return record


def make_inputs(stage: str, n: int, limit: int, seed: int) -> tuple[list[tuple[str, bytes, list]], dict[str, str]]:
    """(key, value, headers) messages in a shuffled order, and the kind of each key: good, near-limit, malformed."""
    rng = random.Random(seed)
    n_bad, n_big = n // 100, n // 200
    kinds: dict[str, str] = {}
    messages = []
    base = good(stage, -1).ByteSize()
    for i in range(n):
        if i < n_bad // 2:
            key = f"garbage-{stage}-{i}"
            messages.append((key, b"\x00\xffnot a protobuf" + os.urandom(16), record_headers()))
            kinds[key] = "malformed"
            continue
        if i < n_bad:
            record, kind = refused(stage, i), "malformed"
        elif i < n_bad + n_big:
            record, kind = good(stage, i, pad=limit - base - rng.randint(600, 4000)), "near-limit"
        else:
            record, kind = good(stage, i), "good"
        out = encode_record(record, "unused")
        kinds[out.key.decode()] = kind
        messages.append((out.key.decode(), out.value, out.headers))
    rng.shuffle(messages)
    return messages, kinds


def read_all(kafka: KafkaSettings, topic: str) -> list[Any]:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        out: list[Any] = []
        deadline = time.monotonic() + 120
        while any(consumer.position(tp) < end[tp] for tp in parts) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500, max_records=5000).values():
                out.extend(batch)
        return out
    finally:
        consumer.close()


def topic_sizes(consumer: KafkaConsumer, topics: list[str]) -> int:
    parts = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
    return sum(consumer.end_offsets(parts).values()) if parts else 0


def dataset_ids(root: Path) -> list[str]:
    import pyarrow.parquet as pq

    folder = root / "poison" / "v1"
    return [
        row for p in sorted(folder.glob("part-*.parquet")) for row in pq.read_table(p, columns=["id"])["id"].to_pylist()
    ]


def origin_id(record: PairRecord) -> str:
    return record.lineage.original_id or record.pair.id


def run_stage(stage: str, args: argparse.Namespace, kafka: KafkaSettings, base_cfg: dict, work: Path) -> dict:
    from synpref.shared.kafka.codec import decode_record

    command, input_route, output_routes = STAGES[stage]
    prefix = f"poison-{stage}-{uuid.uuid4().hex[:6]}"
    topics = TopicSettings(**{name: f"{prefix}.{name}" for name in TopicSettings.model_fields})
    ensure_topics(kafka, topics.all(), partitions=3, replication_factor=1)
    input_topic = getattr(topics, input_route)
    limit = topic_message_limit(kafka, input_topic) or 1_048_588
    messages, kinds = make_inputs(stage, args.records, limit, args.seed)
    cfg = {**base_cfg, "topics": topics.model_dump()}
    cfg["service"] = {**cfg["service"], "group_id": f"{prefix}-group"}
    cfg["writer"] = {"root": str(work / stage / "datasets"), "name": "poison", "version": "v1",
                     "shard_rows": 2000, "flush_interval_s": 1.0}  # fmt: skip
    config = work / f"{stage}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log = work / f"{stage}.log"
    env = {**os.environ, "SYNPREF_CONFIG": str(config), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SYNPREF_KAFKA__BOOTSTRAP_SERVERS", None)
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "synpref.shared.cli", command], env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    outputs = [getattr(topics, r) for r in output_routes]
    watcher = KafkaConsumer(**kafka.client_kwargs(), group_id=None)
    started = time.monotonic()
    try:
        while " ready: " not in log.read_text():
            if proc.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError(f"{stage} did not start; see {log}")
            time.sleep(0.2)
        producer = make_producer(kafka, max_request_size=limit + 64 * 1024)
        sent = time.monotonic()
        for key, value, headers in messages:
            producer.send(input_topic, key=key.encode(), value=value, headers=headers)
        producer.flush(timeout=300)
        producer.close()

        def outcomes() -> int:
            rows = len(dataset_ids(work / stage / "datasets")) if not outputs else 0
            return rows + topic_sizes(watcher, [*outputs, topics.dead_letter])

        deadline = time.monotonic() + args.stage_timeout_s
        while outcomes() < len(messages):
            if proc.poll() is not None:
                raise RuntimeError(f"{stage} exited {proc.returncode} mid-run; see {log}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        drain_s = time.monotonic() - sent
        alive = proc.poll() is None
    finally:
        watcher.close()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9

    arrived: Counter[str] = Counter()
    if outputs:
        for topic in outputs:
            for m in read_all(kafka, topic):
                arrived[origin_id(decode_record(m.value, m.headers))] += 1
    else:
        arrived.update(dataset_ids(work / stage / "datasets"))
    dead: Counter[str] = Counter()
    reasons: dict[str, str] = {}
    dlq_kinds: Counter[str] = Counter()
    for m in read_all(kafka, topics.dead_letter):
        key = m.key.decode() if m.key else ""
        headers = header_map(m.headers)
        dead[key] += 1
        reasons[key] = headers.get(DLQ_REASON, "")
        dlq_kinds[headers.get(DLQ_KIND, "?")] += 1
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in ("good", "near-limit", "malformed")}
    for key, kind in kinds.items():
        a, d = arrived.get(key, 0), dead.get(key, 0)
        outcome = "once" if a == 1 and d == 0 else "dlq" if a == 0 and d == 1 else "lost" if a + d == 0 else "twice"
        if outcome == "dlq" and not reasons.get(key):
            outcome = "dlq-without-reason"
        by_kind[kind][outcome] += 1
    restarts = log.read_text().count(" ready: ") - 1
    ok = (
        by_kind["good"]["once"] == sum(by_kind["good"].values())
        and by_kind["malformed"]["dlq"] == sum(by_kind["malformed"].values())
        and by_kind["near-limit"]["once"] + by_kind["near-limit"]["dlq"] == sum(by_kind["near-limit"].values())
        and alive and code == 0 and restarts == 0
    )  # fmt: skip
    unknown = sum(arrived.values()) + sum(dead.values()) - sum(arrived.get(k, 0) + dead.get(k, 0) for k in kinds)
    return {
        "stage": stage, "records": len(messages), "drain_s": round(drain_s, 1),
        "good": dict(by_kind["good"]), "malformed": dict(by_kind["malformed"]),
        "near_limit": dict(by_kind["near-limit"]),
        "dlq_kinds": dict(dlq_kinds), "unexpected_messages": unknown, "restarts": restarts, "exit_code": code,
        "verdict": "PASS" if ok and unknown == 0 else "FAIL",
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000, help="messages per stage (default 10000)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--stage-timeout-s", type=float, default=900.0, help="most seconds to drain one stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from testing.local_kafka import LocalKafka
    from testing.tiny import build_tiny_reward_model

    work = Path(tempfile.mkdtemp(prefix="poison-bench-"))
    broker = None
    bootstrap = os.environ.get("SYNPREF_KAFKA_BOOTSTRAP")
    if not bootstrap:
        broker = LocalKafka().start()
        bootstrap = broker.bootstrap_servers
    kafka = KafkaSettings(bootstrap_servers=bootstrap, consumer_poll_ms=200, max_batch=64)
    judge_port = free_port()
    judge_url = f"http://127.0.0.1:{judge_port}/v1"
    base_cfg: dict[str, Any] = {
        "kafka": kafka.model_dump(),
        "service": {"host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0, "shutdown_grace_s": 2},
        "annotator": {"judges": [{"name": "judge-a", "base_url": judge_url, "samples": 1}],
                      "cache_dir": "", "max_concurrency": 32, "backoff_s": 0.05},
        "filter": {"stage": 2, "on_disagreement": "flip"},
        "log_level": "WARNING",
    }  # fmt: skip
    if "gold-scorer" in args.stages:
        tiny = {role: build_tiny_reward_model(work / role, layers=1, hidden=32, heads=2, kv_heads=1, seed=s)
                for role, s in (("gold", 1), ("best", 2))}  # fmt: skip
        base_cfg["scoring"] = {
            "gold": {"path": str(tiny["gold"]), "version": "gold-tiny"},
            "best": {"path": str(tiny["best"]), "version": "best-tiny"},
            "max_length": 128, "batch_size": 64,
        }  # fmt: skip
    judges_log = (work / "judges.log").open("wb")
    judges = subprocess.Popen(
        [sys.executable, "-m", "testing.fake_judges", "--port", str(judge_port)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=judges_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    results = []
    try:
        for stage in args.stages:
            result = run_stage(stage, args, kafka, base_cfg, work)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        judges.send_signal(signal.SIGTERM)
        judges.wait(timeout=30)
        if broker is not None:
            broker.stop()
    verdict = "PASS" if results and all(r["verdict"] == "PASS" for r in results) else "FAIL"
    print(f"{'stage':12} {'records':>8} {'good once':>10} {'malformed->DLQ':>15} {'near-limit once/DLQ':>20} "
          f"{'restarts':>8} {'drain s':>8}  verdict")  # fmt: skip
    for r in results:
        near = f"{r['near_limit'].get('once', 0)}/{r['near_limit'].get('dlq', 0)}"
        print(f"{r['stage']:12} {r['records']:>8} {r['good'].get('once', 0):>10} {r['malformed'].get('dlq', 0):>15} "
              f"{near:>20} {r['restarts']:>8} {r['drain_s']:>8}  {r['verdict']}")  # fmt: skip
    print(f"verdict: {verdict} (logs in {work})")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "verdict": verdict}, indent=1))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
