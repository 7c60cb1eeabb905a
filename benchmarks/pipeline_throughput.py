"""Curation pipeline throughput (pairs/s): in process vs over Kafka, 1 vs 2 consumers per stage.

The model calls are replaced by fixed-cost functions (a sleep per pair: --annotate-ms for
the judges, --score-ms for the two RMs) so that what is measured is the pipeline, not a
model. The consistency filter and the Parquet dataset writer are the real ones.

- in process: each batch goes annotate -> score -> filter -> write, one after the other
  (what the embedded single-machine loop does).
- kafka: every stage is a real StageRunner (decode, stage, produce acks=all, flush, commit)
  in its own thread, `--consumers` per stage in one consumer group, over 2-partition topics;
  the writer is the real writer service's runner (shards + manifest with offsets). The clock runs from
  the first produced pair to the writer having taken all of them; group joins happen before.

Pairs are real (LLMBar, PandaLM, hh-rlhf from ../shared/data through the ingest
preprocessing), cycled to --pairs. Uses SYNPREF_KAFKA_BOOTSTRAP if set, else a LocalKafka.

    .venv/bin/python benchmarks/pipeline_throughput.py [--pairs 2000] [--annotate-ms 2] [--score-ms 1]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from synpref.services.consistency_filter.rules import make_filter_stage
from synpref.services.dataset_writer.dataset import DatasetVersion
from synpref.services.dataset_writer.main import DatasetSink, ManifestSink, writable_only
from synpref.services.ingest.preprocess import ingest_paths
from synpref.shared.config import FilterSettings, KafkaSettings, Settings, TopicSettings, WriterSettings
from synpref.shared.kafka.admin import ensure_topics
from synpref.shared.kafka.clients import make_producer
from synpref.shared.kafka.codec import encode_record
from synpref.shared.kafka.runner import RunnerStats, StageRunner
from synpref.shared.pairs import new_pair, new_record, now
from synpref.shared.stage import Stage, StageResult
from synpref.v1.pair_pb2 import PREFERENCE_CHOSEN, PREFERENCE_REJECTED, ModelScore, PairRecord

# testing/ (the local broker: test support, not installed) lives at the repo root.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH = 64
SHARD_ROWS = 1000


def unit(pair_id: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{pair_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def fixed_annotator(cost_s: float) -> Stage:
    """Stands in for the attribute LLM and the judges: cost_s per pair, a deterministic verdict."""

    def annotator(batch: list[PairRecord]) -> StageResult:
        result = StageResult()
        for record in batch:
            time.sleep(cost_s)
            out = PairRecord()
            out.CopyFrom(record)
            out.attributes.task_category = ("coding", "advice", "math")[int(unit(out.pair.id, "c") * 3)]
            chosen = unit(out.pair.id, "j") < 0.7
            out.judge_aggregate.preference = PREFERENCE_CHOSEN if chosen else PREFERENCE_REJECTED
            out.lineage.steps.append("annotator")
            result.emit("annotated", out)
        return result

    return annotator


def fixed_scorer(cost_s: float) -> Stage:
    """Stands in for the gold and best RMs: cost_s per pair, deterministic p_gold / p_best."""

    def gold_scorer(batch: list[PairRecord]) -> StageResult:
        result = StageResult()
        for record in batch:
            time.sleep(cost_s)
            out = PairRecord()
            out.CopyFrom(record)
            for role in ("gold", "best"):
                out.scores.append(ModelScore(model=role, version=f"{role}-fixed", p=unit(out.pair.id, role)))
            out.lineage.steps.append("gold-scorer")
            out.lineage.updated_at.CopyFrom(now())
            result.emit("scored", out)
        return result

    return gold_scorer


def load_pairs(n: int) -> list[PairRecord]:
    sources = [DATA / "LLMBar", DATA / "PandaLM", DATA / "hh-rlhf"]
    if DATA.exists():
        base, _ = ingest_paths([p for p in sources if p.exists()])
    else:
        base = [
            new_record(new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                                [{"role": "assistant", "content": "b"}], "synthetic"))
            for i in range(n)
        ]  # fmt: skip
    out = []
    for i in range(n):
        record = PairRecord()
        record.CopyFrom(base[i % len(base)])
        if i >= len(base):
            # Cycled copies need their own ids, or the writer would (rightly) drop them as duplicates.
            record.pair.meta["copy"] = str(i // len(base))
            record.pair.id = hashlib.sha256(f"{record.pair.id}:{i}".encode()).hexdigest()[:32]
        out.append(record)
    return out


def run_in_process(
    records: list[PairRecord], annotate: Stage, score: Stage, root: Path
) -> tuple[float, int, dict[str, float]]:
    decide = make_filter_stage(FilterSettings(stage=2, on_disagreement="flip"))
    dataset = DatasetVersion(root, "bench", f"inproc-{uuid.uuid4().hex[:6]}")
    spent = dict.fromkeys(("annotate", "score", "filter", "write"), 0.0)

    def timed(name, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        spent[name] += time.perf_counter() - t
        return out

    started = time.perf_counter()
    buffered: list[PairRecord] = []
    for i in range(0, len(records), BATCH):
        batch = records[i : i + BATCH]
        scored = [r for _, r in timed("score", score, batch).routed]
        annotated = [r for _, r in timed("annotate", annotate, scored).routed]
        buffered += [r for route, r in timed("filter", decide, annotated).routed if route == "curated"]
        if len(buffered) >= SHARD_ROWS:  # shards of the same size as the Kafka writer's
            timed("write", dataset.append, buffered)
            buffered = []
    timed("write", dataset.append, buffered)
    dataset.close()
    return time.perf_counter() - started, dataset.stats["rows"], spent


def run_kafka(
    records: list[PairRecord], kafka: KafkaSettings, consumers: int, annotate: Stage, score: Stage, root: Path
) -> tuple[float, int]:
    base = f"bench-{uuid.uuid4().hex[:8]}"
    topics = TopicSettings(**{route: f"{base}.{route}" for route in TopicSettings.model_fields})
    ensure_topics(kafka, topics.all(), partitions=2, replication_factor=1)
    settings = Settings(
        kafka=kafka.model_copy(update={"max_batch": BATCH, "consumer_poll_ms": 50}),
        topics=topics,
        filter=FilterSettings(stage=2, on_disagreement="flip"),
        writer=WriterSettings(root=str(root), name="bench", version=base, shard_rows=SHARD_ROWS, flush_interval_s=0.5),
    )
    stop = threading.Event()
    runners = []
    decide = make_filter_stage(settings.filter)
    for name, route, stage in (("gold-scorer", "raw", score), ("annotator", "scored", annotate),
                               ("filter", "annotated", decide)):  # fmt: skip
        for _ in range(consumers):
            runner = StageRunner(settings, stage, service=name, input_route=route, group_id=f"{base}-{name}", stop=stop)
            runner.open()
            runners.append(runner)
    writer_stats = RunnerStats()
    target = DatasetSink(DatasetVersion(root, "bench", base))
    writer = StageRunner(settings, writable_only, service="writer", input_route="curated", group_id=f"{base}-writer",
                         stop=stop, stats=writer_stats, sink=ManifestSink(target, settings.writer))  # fmt: skip
    writer.open()
    threads = [threading.Thread(target=r.run, daemon=True) for r in runners]
    threads.append(threading.Thread(target=writer.run, daemon=True))
    for t in threads:
        t.start()
    # Group joins and partition assignment are not pipeline throughput: wait them out first.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if all(r.consumer is not None and r.consumer.assignment() for r in runners):
                break
        time.sleep(0.1)
    time.sleep(1.0)
    producer = make_producer(kafka)
    started = time.perf_counter()
    for record in records:
        out = encode_record(record, topics.s2_raw)
        producer.send(out.topic, key=out.key, value=out.value, headers=out.headers)
    producer.flush(60)
    while writer_stats.processed < len(records) and time.perf_counter() - started < 600:
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join(60)
    producer.close(10)
    target.dataset.close()
    return elapsed, target.dataset.stats["rows"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--annotate-ms", type=float, default=2.0, help="fixed judge cost per pair")
    parser.add_argument("--score-ms", type=float, default=1.0, help="fixed RM cost per pair")
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    records = load_pairs(args.pairs)
    annotate, score = fixed_annotator(args.annotate_ms / 1000), fixed_scorer(args.score_ms / 1000)
    print(f"pipeline throughput: {len(records)} real pairs, annotate {args.annotate_ms} ms/pair, "
          f"score {args.score_ms} ms/pair, batches of {BATCH}, filter + Parquet writer real")  # fmt: skip
    cost = args.annotate_ms + args.score_ms
    if cost > 0:
        print(f"  (fixed costs alone: {1000 / cost:.0f} pairs/s for one sequential worker, "
              f"{1000 / max(args.annotate_ms, args.score_ms):.0f} pairs/s for pipelined stages)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="synpref-bench-") as tmp:
        root = Path(tmp)
        # pyarrow's first Table.from_pylist pays a one-off start-up of seconds: not per-pair work.
        with DatasetVersion(root, "bench", "warm-up") as warm_up:
            warm_up.append(records[:1])
        seconds, rows, spent = run_in_process(records, annotate, score, root)
        rate = len(records) / seconds
        where_time = ", ".join(f"{k} {v:.2f} s" for k, v in spent.items())
        print(f"  in process                   : {rate:8.1f} pairs/s  ({seconds:.2f} s: {where_time}; {rows} rows)")
        external = os.environ.get("SYNPREF_KAFKA_BOOTSTRAP", "").strip()
        with contextlib.ExitStack() as stack:
            if external:
                bootstrap, where = external, f"external Kafka at {external}"
            else:
                from testing.local_kafka import LocalKafka

                broker = stack.enter_context(LocalKafka())
                bootstrap, where = broker.bootstrap_servers, broker.describe()
            kafka = KafkaSettings(bootstrap_servers=bootstrap)
            for consumers in args.consumers:
                seconds, rows = run_kafka(records, kafka, consumers, annotate, score, root)
                rate = len(records) / seconds
                print(
                    f"  kafka, {consumers} consumer(s) per stage: {rate:8.1f} pairs/s  ({seconds:.2f} s; {rows} rows)"
                )
            print(f"  broker: {where}; stages as threads of one process, 2 partitions per topic")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
