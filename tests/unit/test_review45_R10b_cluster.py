"""Review 45 (R10b): the controller's cluster side when the cluster misbehaves.

A partition without a leader while the Kafka executor looks up its end offsets; a training Job the TTL controller
deletes while a restarted controller adopts it; two runs of a kept workdir writing a model's training pairs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from synpref.services.controller import executors
from synpref.services.controller.cluster_models import ClusterJobs, K8sModels
from synpref.shared.config import Settings, TopicSettings, load_settings
from synpref.shared.kafka import clients
from synpref.shared.kafka.codec import decode_record, encode_record
from synpref.shared.pairs import new_pair, new_record
from synpref.training.k8s_job import JobBackend
from synpref.v1.pair_pb2 import DECISION_KEEP
from testing.group_consumer import RecordingProducer, Topics, TopicsConsumer


class Broker(Topics):
    """Stage 2 as topics, on a fake clock; the s2_decided partition has no leader for `leaderless` look-ups of its end
    offset, each answered the way kafka-python 3.0.12 does when its timeout_ms runs out (`answer`)."""

    def __init__(self, leaderless: int, answer: str) -> None:
        super().__init__()
        self.names = TopicSettings()
        self.leaderless, self.answer = leaderless, answer
        self.now, self.lookups, self.decided = 0.0, 0, 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def decide(self) -> None:
        for msg in self.messages(self.names.s2_raw)[self.decided :]:
            record = decode_record(msg.value, msg.headers)
            record.decision.decision = DECISION_KEEP
            sent = encode_record(record, self.names.s2_decided)
            self.append(sent.topic, sent.key, sent.value, sent.headers)
            self.decided += 1

    def consumer(self) -> TopicsConsumer:
        broker = self

        class Consumer(TopicsConsumer):
            def position(self, partition: TopicPartition, timeout_ms: int | None = None) -> int | None:
                if partition.topic != broker.names.s2_decided or broker.lookups >= broker.leaderless:
                    return super().position(partition, timeout_ms)
                if timeout_ms is None:  # what 3.0.12 does then: ask again for ever, and say nothing
                    raise RuntimeError("the end offset look-up has no timeout: it blocks while there is no leader")
                broker.lookups += 1
                broker.now += timeout_ms / 1000
                if broker.answer == "raise":
                    raise KafkaTimeoutError("Failed to get offsets by timestamps in 30000 ms")
                return None

            def poll(
                self, timeout_ms: int = 0, max_records: int | None = None, update_offsets: bool = True
            ) -> dict[TopicPartition, list[Any]]:
                broker.now += timeout_ms / 1000
                broker.decide()
                return super().poll(timeout_ms, max_records, update_offsets)

        return Consumer(self)


def run_stage2(broker: Broker, monkeypatch: pytest.MonkeyPatch, n: int = 2) -> tuple[list[Any], Any]:
    monkeypatch.setattr(executors, "time", broker)
    monkeypatch.setattr(clients, "make_producer", lambda kafka: RecordingProducer(broker))
    monkeypatch.setattr(clients, "make_consumer", lambda kafka, group, **kw: broker.consumer())
    good, bad = [{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}]
    batch = [new_record(new_pair([{"role": "user", "content": f"q{i}"}], good, bad, source="unit")) for i in range(n)]
    executor = executors.KafkaExecutor(Settings(topics=broker.names), timeout_s=120)
    return batch, executor.run("stage2", batch)


@pytest.mark.parametrize("answer", ["none", "raise"])
def test_end_offsets_of_a_partition_without_a_leader_are_asked_again_with_a_bound(monkeypatch, caplog, answer) -> None:
    # Without timeout_ms kafka-python asks for ever: the controller hung, silently, until the partition had a leader.
    broker = Broker(leaderless=2, answer=answer)
    with caplog.at_level(logging.WARNING, logger=executors.__name__):
        batch, result = run_stage2(broker, monkeypatch)
    assert sorted(r.pair.id for _, r in result.routed) == sorted(r.pair.id for r in batch)
    assert broker.lookups == 2
    assert f"waiting for the end offsets of ['{broker.names.s2_decided}:0']" in caplog.text
    assert broker.now < 2 * 30 + 2 * 5 + 10, "each look-up waits request_timeout_ms at most"


def test_end_offsets_that_never_come_are_a_clear_timeout(monkeypatch) -> None:
    broker = Broker(leaderless=10**6, answer="none")
    with pytest.raises(TimeoutError, match=r"end offsets of \['.+:0'\] are not known after 120s: .* a leader"):
        run_stage2(broker, monkeypatch)
    assert broker.now <= 120 + 5, "the wait ends at timeout_s"


class Api:
    """The batch/v1 and core/v1 calls of a JobBackend, in memory: Jobs created complete at once; `gone` Jobs are
    listed but read as HTTP 404 (deleted between the list and the read)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Any] = {}
        self.gone: set[str] = set()
        self.created: list[str] = []

    def create_namespaced_job(self, namespace: str, body: Any, **kw: Any) -> Any:
        from kubernetes import client

        body.metadata.uid = f"uid-{body.metadata.name}"
        done = client.V1JobCondition(type="Complete", status="True")
        body.status = client.V1JobStatus(conditions=[done])
        self.jobs[body.metadata.name] = body
        self.created.append(body.metadata.name)
        return body

    def list_namespaced_job(self, namespace: str, label_selector: str, **kw: Any) -> Any:
        from kubernetes import client

        wanted = dict(pair.split("=", 1) for pair in label_selector.split(","))
        found = [j for j in self.jobs.values() if wanted.items() <= (j.metadata.labels or {}).items()]
        return client.V1JobList(items=found)

    def read_namespaced_job(self, name: str, namespace: str, **kw: Any) -> Any:
        from kubernetes import client

        if name in self.gone or name not in self.jobs:
            raise client.ApiException(status=404, reason="Not Found")
        return self.jobs[name]

    def create_namespaced_config_map(self, namespace: str, body: Any, **kw: Any) -> None: ...

    def replace_namespaced_config_map(self, name: str, namespace: str, body: Any, **kw: Any) -> None: ...

    def list_namespaced_pod(self, namespace: str, label_selector: str, **kw: Any) -> Any:
        from kubernetes import client

        return client.V1PodList(items=[])


PAIRS = [
    {"conversation": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "bad"}]} for i in range(3)
]  # fmt: skip


def models_over(api: Api, workdir: Path) -> K8sModels:
    backend = object.__new__(JobBackend)  # its API clients are the in-memory ones
    backend.batch, backend.core = api, api  # type: ignore[assignment]
    settings = load_settings(controller={"workdir": str(workdir), "training": "k8s",
                                         "k8s_job": {"image": "synpref/train:1", "namespace": "curation"}})  # fmt: skip
    return K8sModels(settings.controller, workdir, backend=ClusterJobs(backend))


def test_a_complete_job_being_deleted_is_trained_again_not_adopted(tmp_path) -> None:
    # The TTL controller deletes a finished Job in the foreground: it is listed, with a deletionTimestamp, until its
    # pods are gone. Adopted, its read 404'd a moment later and the controller crashed, then trained it again.
    from datetime import UTC, datetime

    api = Api()
    models_over(api, tmp_path).train("gold", PAIRS, [], tmp_path / "models")
    first = api.created[0]
    api.jobs[first].metadata.deletion_timestamp = datetime.now(UTC)
    handle = models_over(api, tmp_path).train("gold", PAIRS, [], tmp_path / "models")
    assert api.created == [first, first[:-1] + "2"], "a new attempt, named after the one being deleted"
    assert handle.version == f"gold-{api.created[1]}"


def test_an_adopted_job_deleted_before_its_read_is_trained_again(tmp_path, caplog) -> None:
    api = Api()
    models_over(api, tmp_path).train("gold", PAIRS, [], tmp_path / "models")
    first = api.created[0]
    api.gone.add(first)  # listed, then deleted by its TTL before the restarted controller reads its outcome
    with caplog.at_level(logging.WARNING):
        handle = models_over(api, tmp_path).train("gold", PAIRS, [], tmp_path / "models")
    assert api.created == [first, first[:-1] + "2"] and handle.version == f"gold-{api.created[1]}"
    assert f"Job curation/{first} was deleted before its outcome was read: training gold again" in caplog.text


class Jobs:
    """The cluster calls K8sModels makes; each Job ends `status`, and its wait notes the pairs the Job reads."""

    def __init__(self, status: str) -> None:
        self.status, self.read, self.config = status, [], {}

    def find(self, namespace: str, labels: dict) -> list:
        return []

    def apply_config_map(self, manifest: dict) -> None:
        self.config = yaml.safe_load(next(iter(manifest["data"].values())))

    def submit(self, spec: Any) -> None: ...

    def wait(self, namespace: str, name: str, timeout_s: float) -> str:
        self.read = [json.loads(line) for line in Path(self.config["train_files"][0]).read_text().splitlines()]
        return self.status


def test_each_run_of_a_kept_workdir_writes_its_own_training_pairs(tmp_path) -> None:
    # The model's folder was the run's own, its training pairs were not: a new run rewrote the file a Job of the
    # abandoned run still read, and that Job trained (and wrote checkpoints) on the new run's pairs.
    abandoned = Jobs("Failed")
    models = K8sModels(models_over(Api(), tmp_path).s, tmp_path, backend=abandoned)
    with pytest.raises(RuntimeError, match="ended Failed"):
        models.train("gold", PAIRS[:1], [], tmp_path / "models")
    old_file = Path(abandoned.config["train_files"][0])
    models.new_run()
    models.backend = fresh = Jobs("Complete")
    models.train("gold", PAIRS[1:], [], tmp_path / "models")
    new_file = Path(fresh.config["train_files"][0])
    assert models.run_id in new_file.name and new_file != old_file
    assert fresh.read == PAIRS[1:]
    assert [json.loads(line) for line in old_file.read_text().splitlines()] == PAIRS[:1]
    # Read by its Job only: gone once the Job is Complete (a failed one's stay for a look, and are written again).
    assert not new_file.exists() and not Path(fresh.config["eval_files"][0]).exists()
