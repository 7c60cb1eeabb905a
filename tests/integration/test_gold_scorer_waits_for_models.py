"""Issue 13, defect 12: a gold-scorer that starts before the scorer has its models dead-lettered every pair.

In the cluster the ingest Job published 762 pairs while the scorer was still waiting for its checkpoints
to land on the volume; the scorer answered FAILED_PRECONDITION ("no model is loaded") and the runner
dead-lettered all of them as stage errors. Now the gold-scorer's gRPC stage raises StageUnavailable for
the scorer's own state, and the runner reads the batch again after a pause. Real broker, real scorer on
loopback, the real gold-scorer stage: nothing is dead-lettered, and every pair is scored once the
model is loaded by an admin reload.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from kafka_broker import produce, read_topic
from prometheus_client import REGISTRY

from synpref.services.gold_scorer.scoring import make_scoring_stage, models_from_settings
from synpref.services.scorer.server import BackgroundScorer
from synpref.shared.config import ScorerSettings
from synpref.shared.kafka.codec import decode_record
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.pairs import new_pair, new_record
from testing.tiny import build_tiny_reward_model

pytestmark = pytest.mark.integration
torch.set_num_threads(1)
TOKEN = "admin-token-for-the-gold-scorer-test"
PAIRS = 40


def test_pairs_wait_for_the_scorers_models_instead_of_being_dead_lettered(
    tmp_path: Path, kafka_settings, unique_topics, unique_group
) -> None:
    build_tiny_reward_model(tmp_path / "models" / "v1", arch="qwen3", seed=3)
    (tmp_path / "token").write_text(TOKEN)
    scorer = ScorerSettings(
        port=0, http_port=0, metrics_port=0, admin_enabled=True, admin_port=0,
        admin_token_file=str(tmp_path / "token"), model_root=str(tmp_path / "models"),
    )  # fmt: skip
    topics = unique_topics(partitions=1)
    records = [
        new_record(
            new_pair(
                [{"role": "user", "content": f"question {i}"}],
                [{"role": "assistant", "content": f"a fine answer {i}"}],
                [{"role": "assistant", "content": "no"}],
                source="it",
            )
        )
        for i in range(PAIRS)
    ]
    produce(kafka_settings.kafka, topics.s2_raw, records)
    with BackgroundScorer(scorer) as bg:
        settings = kafka_settings.model_copy(
            update={
                "topics": topics,
                "scoring": kafka_settings.scoring.model_copy(update={"mode": "grpc", "scorer_address": bg.address}),
            }
        )
        stage = make_scoring_stage(models_from_settings(settings.scoring))
        runner = StageRunner(settings, stage, service="it-gold-waits", group_id=unique_group())
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        try:
            # No model yet: the runner puts its batch back, again and again, and sends nothing anywhere.
            deadline = time.monotonic() + 60
            unavailable = "synpref_runner_stage_unavailable_total"
            while (REGISTRY.get_sample_value(unavailable, {"service": "it-gold-waits"}) or 0) < 2:
                assert time.monotonic() < deadline, "the runner never reported the scorer unavailable"
                time.sleep(0.2)
            assert runner.stats.snapshot()["processed"] == 0
            assert read_topic(settings.kafka, topics.dead_letter) == []

            for role in ("gold", "best"):
                body = json.dumps({"model": role, "path": "v1"}).encode()
                headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
                request = urllib.request.Request(bg.admin_url + "/admin/reload", data=body, headers=headers)
                with urllib.request.urlopen(request, timeout=60) as response:
                    assert response.status == 200
            deadline = time.monotonic() + 90
            while runner.stats.snapshot()["processed"] < PAIRS:
                assert time.monotonic() < deadline, f"scored {runner.stats.snapshot()} of {PAIRS}"
                time.sleep(0.2)
        finally:
            runner.stop.set()
            thread.join(timeout=60)
    assert not thread.is_alive()
    scored = [decode_record(m.value, m.headers) for m in read_topic(settings.kafka, topics.s2_scored)]
    assert sorted(r.pair.id for r in scored) == sorted(r.pair.id for r in records)
    assert all({s.model for s in r.scores} == {"gold", "best"} for r in scored)
    assert read_topic(settings.kafka, topics.dead_letter) == []
