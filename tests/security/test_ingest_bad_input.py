"""Issue 12, item 5: hostile input files must not abort `synpref ingest` half-way.

Each test runs the real `synpref ingest` process against the session's Kafka broker and a
fresh raw topic, then runs it again with the same --seen file: the first run must publish
every good row once and report the bad ones (row errors as file#row, unreadable files by
name, no traceback), always print its counts and write the seen-file; the rerun must
publish nothing.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kafka_broker import read_topic, topic_size, unique_name

from synpref.shared.kafka.admin import ensure_topics
from synpref.shared.kafka.codec import decode_record

pytestmark = pytest.mark.integration

BROKER_DEFAULT_LIMIT = 1_048_588
"""Kafka's message.max.bytes default: a topic created without max.message.bytes has it."""


def rows(start: int, count: int, tag: str) -> list[bytes]:
    return [
        json.dumps({"prompt": f"{tag} question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}).encode()
        for i in range(start, start + count)
    ]


def raw_topic(kafka: Any, label: str) -> str:
    topic = unique_name(f"t-ingest-{label}")
    ensure_topics(
        kafka, [topic], partitions=1, replication_factor=1, configs={"max.message.bytes": str(BROKER_DEFAULT_LIMIT)}
    )
    return topic


def ingest(kafka: Any, topic: str, tmp_path: Path, *paths: Path) -> tuple[int, dict[str, Any] | None, str]:
    """Exit status, the counts line (None if there was none) and stderr of one run."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYNPREF_")}
    env.update({"SYNPREF_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "SYNPREF_TOPICS__S2_RAW": topic})
    cmd = [sys.executable, "-m", "synpref.shared.cli", "ingest", *map(str, paths)]
    cmd += ["--seen", str(tmp_path / "seen.txt"), "--report", str(tmp_path / "report.jsonl")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, json.loads(lines[-1]) if lines else None, done.stderr


def report(tmp_path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]


def seen(tmp_path: Path) -> list[str]:
    return (tmp_path / "seen.txt").read_text().split()


def test_a_bad_byte_is_one_unreadable_row_and_the_rest_is_read(kafka_settings: Any, tmp_path: Path) -> None:
    kafka = kafka_settings.kafka
    topic = raw_topic(kafka, "bad-byte")
    src = tmp_path / "pairs.jsonl"
    bad_byte = b'{"prompt": "caf\xff", "chosen": "x", "rejected": "y"}'
    lone_surrogate = b'{"prompt": "caf\\ud800", "chosen": "x", "rejected": "y"}'  # valid JSON, no valid text
    src.write_bytes(b"\n".join([*rows(0, 3000, "a"), bad_byte, lone_surrogate, *rows(3000, 1000, "a")]) + b"\n")

    status, counts, stderr = ingest(kafka, topic, tmp_path, src)
    assert status == 0 and counts is not None, stderr
    assert (counts["read"], counts["published"], counts["unreadable"], counts["unacknowledged"]) == (4002, 4000, 2, 0)
    assert counts["reconciles"] and "Traceback" not in stderr
    bad, surrogate = report(tmp_path)
    assert bad["locator"] == f"{src.as_posix()}#3000" and "UTF-8" in bad["reason"], bad
    assert surrogate["locator"] == f"{src.as_posix()}#3001" and "surrogate" in surrogate["reason"], surrogate
    published = read_topic(kafka, topic, expect=4000)
    assert len(published) == 4000
    assert sorted(seen(tmp_path)) == sorted(decode_record(m.value, m.headers).pair.id for m in published)

    status, counts, stderr = ingest(kafka, topic, tmp_path, src)
    assert status == 0 and counts is not None, stderr
    assert (counts["published"], counts["duplicate"]) == (0, 4000)
    assert topic_size(kafka, topic) == 4000


def truncated_gzip(lines: list[bytes]) -> bytes:
    whole = gzip.compress(b"\n".join(lines) + b"\n")
    return whole[: len(whole) // 2]


def test_unreadable_files_are_named_and_the_others_still_published(kafka_settings: Any, tmp_path: Path) -> None:
    kafka = kafka_settings.kafka
    topic = raw_topic(kafka, "files")
    data = tmp_path / "in"
    data.mkdir()
    (data / "a-good.jsonl").write_bytes(b"\n".join(rows(0, 10, "good")) + b"\n")
    (data / "b-deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    deep_row = b'{"prompt": "p", "chosen": ' + b"[" * 100_000 + b"]" * 100_000 + b', "rejected": "r"}'
    (data / "c-deep-row.jsonl").write_bytes(b"\n".join([*rows(0, 3, "deep"), deep_row, *rows(3, 3, "deep")]) + b"\n")
    table = pa.table({"prompt": ["p"] * 50, "chosen": ["c"] * 50, "rejected": ["r"] * 50})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    (data / "d-corrupt.parquet").write_bytes(buffer.getvalue()[:-40])
    (data / "e-truncated.jsonl.gz").write_bytes(truncated_gzip(rows(0, 20_000, "gz")))
    (data / "f-more.jsonl").write_bytes(b"\n".join(rows(0, 10, "more")) + b"\n")

    status, counts, stderr = ingest(kafka, topic, tmp_path, data)
    assert status == 2 and counts is not None, stderr
    assert "Traceback" not in stderr
    failed = {Path(f["path"]).name: f["error"] for f in counts["failed_files"]}
    assert set(failed) == {"b-deep.json", "d-corrupt.parquet", "e-truncated.jsonl.gz"}, failed
    for name in failed:
        assert name in stderr
    assert counts["reconciles"] and counts["unacknowledged"] == 0
    # The deep row is one unreadable row; rows before the gzip's cut are read, and f-more after it.
    [deep] = [r for r in report(tmp_path) if r["bucket"] == "unreadable"]
    assert deep["locator"].endswith("c-deep-row.jsonl#3")
    gz_rows = counts["read"] - 10 - 7 - 10
    assert 0 < gz_rows < 20_000 and counts["published"] == counts["read"] - 1
    file_errors = [r for r in report(tmp_path) if r["bucket"] == "unreadable-file"]
    assert {Path(r["locator"]).name for r in file_errors} == set(failed)
    assert len(seen(tmp_path)) == counts["published"] == topic_size(kafka, topic)

    status, counts2, stderr = ingest(kafka, topic, tmp_path, data)
    assert status == 2 and counts2 is not None, stderr
    assert counts2["published"] == 0 and counts2["duplicate"] == counts["published"]
    assert topic_size(kafka, topic) == counts["published"]


def test_an_oversized_row_is_reported_and_its_neighbours_published(kafka_settings: Any, tmp_path: Path) -> None:
    kafka = kafka_settings.kafka
    topic = raw_topic(kafka, "oversized")
    big = json.dumps({"prompt": "big", "chosen": "x" * 3_000_000, "rejected": "y"}).encode()
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(b"\n".join([*rows(0, 500, "s"), big, *rows(500, 500, "s")]) + b"\n")

    status, counts, stderr = ingest(kafka, topic, tmp_path, src)
    assert status == 0 and counts is not None, stderr
    assert (counts["published"], counts["oversized"], counts["unacknowledged"]) == (1000, 1, 0), counts
    [skipped] = report(tmp_path)
    assert skipped["locator"] == f"{src.as_posix()}#500" and skipped["bucket"] == "oversized"
    assert str(BROKER_DEFAULT_LIMIT) in skipped["reason"]
    assert topic_size(kafka, topic) == 1000 == len(seen(tmp_path))

    status, counts, stderr = ingest(kafka, topic, tmp_path, src)
    assert status == 0 and counts is not None and counts["published"] == 0, stderr
    assert topic_size(kafka, topic) == 1000
