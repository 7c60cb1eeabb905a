"""Run inside a release pod (`kubectl exec -i <pod> -- python - < this file`): where every pair went.

Reads the release's own config (SYNPREF_CONFIG), every outcome topic from the beginning without a
consumer group, and the writer's dataset version on the data volume, and prints one JSON object:
the pair ids of the raw Stage-2 topic, of each outcome (kept and flipped rows of the dataset, review,
discarded, dead-letter) and the lag of every stage's consumer group. Only
synpref's own dependencies are used: this runs in the project image, which holds no test code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
from kafka import KafkaConsumer, TopicPartition

from synpref.services.dataset_writer.dataset import MANIFEST, manifest_files
from synpref.shared.config import load_settings
from synpref.shared.kafka.clients import make_admin


def keys_of(kwargs: dict, topic: str) -> list[str]:
    consumer = KafkaConsumer(**kwargs, enable_auto_commit=False, group_id=None)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        keys: list[str] = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end for tp, end in ends.items()) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200, max_records=5000).values():
                keys.extend(m.key.decode() for m in batch if m.key)
        return keys
    finally:
        consumer.close(autocommit=False)


def lag(settings, kwargs: dict, group: str, topic: str) -> int:
    """Messages of `topic` that `group` has not committed yet (all of them without a commit)."""
    consumer = KafkaConsumer(**kwargs, enable_auto_commit=False, group_id=None)
    admin = make_admin(settings)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(parts)
        committed = admin.list_group_offsets({group: parts}).get(group, {})
        return sum(end - (committed[tp].offset if tp in committed else 0) for tp, end in ends.items())
    finally:
        consumer.close(autocommit=False)
        admin.close()


def main() -> None:
    s = load_settings()
    kwargs = s.kafka.client_kwargs()
    t, w = s.topics, s.writer
    out: dict = {"raw": keys_of(kwargs, t.s2_raw)}
    for name in ("review", "discarded", "dead_letter"):
        out[name] = keys_of(kwargs, getattr(t, name))
    out["kept"], out["flipped"], out["rows"] = [], [], 0
    if (Path(w.root) / w.name / w.version / MANIFEST).exists():
        for shard in manifest_files(w.root, w.name, w.version):
            for row in pq.read_table(shard, columns=["id", "decision", "lineage"]).to_pylist():
                out["rows"] += 1
                if row["decision"]["decision"] == "flip":
                    out["flipped"].append(row["lineage"]["original_id"])
                else:
                    out["kept"].append(row["id"])
    # Every stage's group, so a stall names the stage it is in.
    out["lag"] = {
        "gold-scorer": lag(s.kafka, kwargs, "synpref-gold-scorer", t.s2_raw),
        "annotator": lag(s.kafka, kwargs, "synpref-annotator", t.s2_scored),
        "filter": lag(s.kafka, kwargs, "synpref-filter", t.s2_annotated),
        "writer": lag(s.kafka, kwargs, f"synpref-writer-{w.name}-{w.version}", t.curated),
    }
    print(json.dumps(out))


main()
