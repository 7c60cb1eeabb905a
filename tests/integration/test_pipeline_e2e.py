"""End to end on a real broker: real pairs through ingest, gold-scorer, annotator, filter and writer,
each a separate `synpref` process; the filter and the writer are SIGKILLed mid-stream and restarted.
With no controller the stream is Stage 2 (its own s2 topics) and the filter routes decisions
straight to the writer and the audit topics (--by-decision).

Judges are a fake OpenAI-compatible server (its own process, loopback); the gold and best RMs
are tiny random Qwen3 models. Afterwards: every pair that went in comes out exactly once
(in = kept + flipped + discarded + review + dead-letter, by pair id), the dataset has no
duplicate and loads with `datasets`, and the services stop cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from kafka_broker import committed_to_end, read_topic, topic_size

from synpref.services.dataset_writer.dataset import MANIFEST, load_dataset_version
from synpref.shared.kafka.clients import make_producer
from synpref.shared.kafka.codec import decode_record, header_map, record_headers
from testing import REPO_ROOT
from testing.local_kafka import free_port
from testing.wait import wait_until

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SOURCES = [DATA / "LLMBar", DATA / "PandaLM", DATA / "hh-rlhf"]
ROWS = 2400  # rows read; after ties, empties and duplicates about 2,050 pairs are published
GARBAGE = 5  # undecodable messages injected into the raw topic: they must end in the dead-letter topic
DEADLINE_S = 420  # a bound for slow CI machines; about 2-3 minutes here


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name, self.cmd, self.env = name, cmd, env
        self.log = logdir / f"{name}.log"
        self.runs = 0
        self.p: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.runs += 1
        fh = self.log.open("a")
        fh.write(f"--- start {self.runs}\n")
        fh.flush()
        self.p = subprocess.Popen(self.cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        fh.close()
        return self

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if text.count(" ready: ") >= self.runs:
                return
            if self.p is not None and self.p.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.p.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready in {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.p is not None
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(30)

    def terminate(self, timeout_s: float = 60) -> int:
        if self.p is None or self.p.poll() is not None:
            return self.p.returncode if self.p else 0
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(10)
            return -9


def synpref(*args: str) -> list[str]:
    return [sys.executable, "-m", "synpref.shared.cli", *args]


@pytest.fixture(scope="module")
def tiny_rms(tmp_path_factory):
    from testing.tiny import build_tiny_reward_model

    root = tmp_path_factory.mktemp("rms")
    gold = build_tiny_reward_model(root / "gold-v3", layers=1, hidden=32, heads=2, kv_heads=1, seed=1)
    best = build_tiny_reward_model(root / "best-v7", layers=1, hidden=32, heads=2, kv_heads=1, seed=2)
    return gold, best


@contextmanager
def stall_report(procs: dict[str, Proc], kafka, topics) -> Iterator[None]:
    """On a timeout, say where the stream stopped: each stage topic's size and each service's log tail."""
    try:
        yield
    except TimeoutError as e:
        names = ("s2_raw", "s2_scored", "s2_annotated", "curated", "review", "discarded", "dead_letter")
        sizes = {n: topic_size(kafka, getattr(topics, n)) for n in names}
        tails = "\n".join(f"--- {n} (pid {p.p.pid if p.p else None}, exit {p.p.poll() if p.p else None})\n"
                          f"{p.log.read_text()[-4000:]}" for n, p in procs.items())  # fmt: skip
        raise AssertionError(f"{e}\ntopic sizes: {sizes}\n{tails}") from e


def ids_by_key(messages) -> set[str]:
    return {m.key.decode() for m in messages if m.key}


@pytest.mark.slow  # about 3 minutes: five service processes, a crash and a restart
@pytest.mark.skipif(not DATA.exists(), reason="../shared/data is not present")
def test_real_pairs_through_all_services_with_crashes(kafka_settings, unique_topics, tmp_path, tiny_rms):
    started = time.monotonic()
    kafka = kafka_settings.kafka
    topics = unique_topics(partitions=2)
    gold, best = tiny_rms
    judge_port = free_port()
    config = {
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "max_batch": 64, "consumer_poll_ms": 200},
        "topics": topics.model_dump(),
        "service": {"host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0, "shutdown_grace_s": 2},
        "annotator": {
            "judges": [
                {"name": "judge-a", "base_url": f"http://127.0.0.1:{judge_port}/v1", "samples": 2},
                {"name": "judge-b", "base_url": f"http://127.0.0.1:{judge_port}/v1", "samples": 1},
            ],
            "attribute_model": {"name": "attr", "base_url": f"http://127.0.0.1:{judge_port}/v1"},
            "cache_dir": str(tmp_path / "judge-cache"),
            "max_concurrency": 16,
            "backoff_s": 0.05,
        },
        "scoring": {
            "gold": {"path": str(gold), "version": "gold-v3"},
            "best": {"path": str(best), "version": "best-v7"},
            "max_length": 128,
            "batch_size": 64,
        },
        "filter": {"stage": 2, "on_disagreement": "flip"},
        "writer": {"root": str(tmp_path / "datasets"), "name": "e2e", "version": "v1", "shard_rows": 100,
                   "flush_interval_s": 1.0},
        "log_level": "INFO",
    }  # fmt: skip
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "SYNPREF_CONFIG": str(cfg), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SYNPREF_KAFKA__BOOTSTRAP_SERVERS", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    fake_judges = [sys.executable, "-m", "testing.fake_judges", "--port", str(judge_port)]
    fake = Proc("judges", fake_judges, {**env, "PYTHONPATH": str(REPO_ROOT)}, logs).start()
    commands = {"gold-scorer": [], "annotator": [], "filter": ["--by-decision"], "writer": []}
    procs = {name: Proc(name, synpref(name, *args), env, logs) for name, args in commands.items()}
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_ready()

        ingest = subprocess.run(
            synpref("ingest", *map(str, SOURCES), "--limit", str(ROWS), "--report", str(tmp_path / "rejects.jsonl")),
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert ingest.returncode == 0, ingest.stderr[-3000:]
        counts = json.loads(ingest.stdout.strip().splitlines()[-1])
        assert counts["reconciles"] and counts["read"] == ROWS and counts["unacknowledged"] == 0
        assert counts["published"] >= 2000
        producer = make_producer(kafka)
        for i in range(GARBAGE):
            producer.send(
                topics.s2_raw, key=f"garbage-{i}".encode(), value=b"\x00not a protobuf", headers=record_headers()
            )
        producer.flush(30)
        producer.close()
        expected = counts["published"] + GARBAGE
        phases = {"ingested": time.monotonic() - started}

        # Crash the filter and the writer once the writer has committed a few shards.
        manifest = tmp_path / "datasets" / "e2e" / "v1" / MANIFEST

        def rows_written() -> int:
            return json.loads(manifest.read_text())["rows"] if manifest.exists() else 0

        with stall_report(procs, kafka, topics):
            wait_until(lambda: rows_written() >= 300, DEADLINE_S - (time.monotonic() - started), "300 rows written")
        rows_at_kill = json.loads(manifest.read_text())["rows"]
        phases["killed"] = time.monotonic() - started
        procs["filter"].kill()
        procs["writer"].kill()
        assert rows_at_kill < counts["published"], "the stream ended before the crash: raise ROWS"
        procs["filter"].start()
        procs["writer"].start()
        procs["filter"].wait_ready()
        procs["writer"].wait_ready()

        def outcome_sizes() -> int:
            others = sum(topic_size(kafka, t) for t in (topics.review, topics.discarded, topics.dead_letter))
            return rows_written() + others

        left_s = DEADLINE_S - (time.monotonic() - started)
        outcomes_wanted = f"{expected} outcomes (rows, review, discarded, DLQ)"
        with stall_report(procs, kafka, topics):
            wait_until(lambda: outcome_sizes() >= expected, left_s, outcomes_wanted)
        phases["drained"] = time.monotonic() - started
        # Re-deliveries after the restart count only once the filter and the writer consumed their whole input
        # (the groups are synpref-<service>, the runner's default, and the writer's synpref-writer-<name>-<version>).
        wait_until(
            lambda: (
                committed_to_end(kafka, "synpref-filter", topics.s2_annotated)
                and committed_to_end(kafka, "synpref-writer-e2e-v1", topics.curated)
            ),
            60,
            "the filter and the writer to commit the end of their input topics",
        )
    finally:
        exit_codes = {name: proc.terminate() for name, proc in procs.items()}
        fake.terminate()

    assert exit_codes == {name: 0 for name in procs}, {n: procs[n].log.read_text()[-2000:] for n in procs}
    published = ids_by_key(read_topic(kafka, topics.s2_raw)) - {f"garbage-{i}" for i in range(GARBAGE)}
    assert len(published) == counts["published"]

    dataset = load_dataset_version(tmp_path / "datasets", "e2e", "v1")
    ids = dataset["id"]
    assert len(ids) == len(set(ids)), "a pair was written twice"
    decisions = [d["decision"] for d in dataset["decision"]]
    kept = {i for i, d in zip(ids, decisions, strict=True) if d == "keep"}
    flipped = {lin["original_id"] for lin, d in zip(dataset["lineage"], decisions, strict=True) if d == "flip"}
    assert len(flipped) == decisions.count("flip")
    review = ids_by_key(read_topic(kafka, topics.review))
    discarded = ids_by_key(read_topic(kafka, topics.discarded))
    dlq_messages = read_topic(kafka, topics.dead_letter)
    dead = ids_by_key(dlq_messages)
    outcomes = [kept, flipped, discarded, review, dead]
    union = set().union(*outcomes)
    assert sum(len(s) for s in outcomes) == len(union), "a pair has two outcomes"
    assert union == published | {f"garbage-{i}" for i in range(GARBAGE)}, (
        f"missing {len(published - union)}, unexpected {len(union - published)}"
    )
    assert {f"garbage-{i}" for i in range(GARBAGE)} <= dead
    kinds = {header_map(m.headers).get("synpref-dlq-kind") for m in dlq_messages}
    assert "undecodable" in kinds

    # What each pair carries: attributes, votes of both judges, scores with versions, a reasoned decision.
    row = dataset[0]
    assert row["attributes"]["task_category"] and row["decision"]["reason"]
    assert {s["model"]: s["version"] for s in row["scores"]} == {"gold": "gold-v3", "best": "best-v7"}
    assert row["lineage"]["steps"][:4] == ["ingest", "gold-scorer", "annotator", "consistency-filter"]
    assert row["chosen"][: len(row["conversation"])] == row["conversation"]
    stats = json.loads(manifest.read_text())["stats"]
    assert sum(stats["by_decision"].values()) == len(ids)
    assert procs["writer"].runs == 2 and procs["filter"].runs == 2

    elapsed = time.monotonic() - started
    sample = decode_record(read_topic(kafka, topics.s2_annotated, expect=1)[0].value, record_headers())
    assert len(sample.votes) == 3  # judge-a x 2 samples + judge-b x 1
    print(
        f"\nE2E: in={len(published) + GARBAGE} kept={len(kept)} flipped={len(flipped)} discarded={len(discarded)} "
        f"review={len(review)} dead_letter={len(dead)} rows_at_kill={rows_at_kill} "
        f"dataset_rows={len(ids)} curated_messages={topic_size(kafka, topics.curated)} elapsed={elapsed:.1f}s "
        f"phases={ {k: round(v, 1) for k, v in phases.items()} }"
    )
    assert re.match(r"^[0-9a-f]{32}$", ids[0])
