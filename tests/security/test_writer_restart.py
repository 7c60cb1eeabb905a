"""Issue 12: a writer restarted after a crash must resume promptly, not after the session timeout.

SIGKILL leaves the dead writer in its consumer group; a new member then waits until the
group gives up on the old one (kafka.session_timeout_ms, 45 s by default) before it gets
the curated partitions. Before the fix, rows produced after the restart landed only then.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kafka_broker import produce
from synpref_procs import Proc, watch_alive, write_config

from synpref.services.dataset_writer.dataset import MANIFEST
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord

pytestmark = pytest.mark.integration

SESSION_TIMEOUT_S = 45
RESUME_BOUND_S = 20  # well under the session timeout, with room for a loaded CI machine


def kept(i: int) -> PairRecord:
    record = new_record(
        new_pair(
            [{"role": "user", "content": f"q{i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="security",
        )
    )
    record.decision.decision = DECISION_KEEP
    return record


def test_a_killed_writer_resumes_well_within_the_session_timeout(
    kafka_settings: Any, unique_topics: Any, unique_group: Any, tmp_path: Any
) -> None:
    kafka = kafka_settings.kafka
    topics = unique_topics(partitions=2)
    config = write_config(
        tmp_path / "config.yaml", kafka.bootstrap_servers, topics,
        kafka={"session_timeout_ms": SESSION_TIMEOUT_S * 1000}, service={"group_id": unique_group()},
        writer={"root": str(tmp_path / "datasets"), "name": "sec", "version": "v1", "flush_interval_s": 0.2},
    )  # fmt: skip
    manifest = tmp_path / "datasets" / "sec" / "v1" / MANIFEST

    def rows() -> int:
        return json.loads(manifest.read_text())["rows"] if manifest.exists() else 0

    writer = Proc("writer", ["writer"], config, tmp_path).start()
    try:
        writer.wait_ready()
        produce(kafka, topics.curated, [kept(i) for i in range(4)])
        watch_alive(writer, lambda: rows() == 4, 90, "the first four rows")
        writer.kill()
        writer.start()
        writer.wait_ready()
        produced_at = time.monotonic()
        produce(kafka, topics.curated, [kept(i) for i in range(4, 8)])
        watch_alive(
            writer,
            lambda: rows() == 8,
            RESUME_BOUND_S,
            f"the rows produced after the restart, within {RESUME_BOUND_S} s",
        )
        resumed_s = time.monotonic() - produced_at
        print(f"\nwriter resumed {resumed_s:.1f} s after the restart's rows were produced")
    finally:
        code = writer.stop()
    assert code == 0, writer.text()[-3000:]
