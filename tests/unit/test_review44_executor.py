"""Review 44: the controller's Kafka executor and its training Jobs on a cluster.

The executor runs against topics held as lists and a Stage-2 pipeline that works through its input a few
messages per consumer poll, each poll a second of a fake clock. Jobs run against stand-ins for the Kubernetes
client's batch and core APIs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from synpref.services.controller import executors
from synpref.services.controller.cluster_models import ClusterJobs, K8sModels
from synpref.shared.config import Settings, TopicSettings, load_settings
from synpref.shared.kafka import clients
from synpref.shared.kafka.codec import dead_letter, decode_record, encode_record
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord
from testing.group_consumer import RecordingProducer, Topics, TopicsConsumer


class Pipeline(Topics):
    """Topics; each poll decides `per_poll` Stage-2 inputs (KEEP), or dead-letters those whose pair id is in
    `too_large` the way the stage services do when the dead-letter copy is over the topic's limit."""

    def __init__(self, topics: TopicSettings, per_poll: int, too_large: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.names, self.per_poll, self.too_large = topics, per_poll, too_large
        self.now, self.done = 0.0, 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def work(self) -> None:
        inputs = self.messages(self.names.s2_raw)
        for msg in inputs[self.done : self.done + self.per_poll]:
            record = decode_record(msg.value, msg.headers)
            if record.pair.id in self.too_large:
                out = dead_letter(self.names.dead_letter, key=msg.key, value=msg.value, headers=msg.headers,
                                  kind="too-large", reason="output over the limit", service="annotator",
                                  source_topic=self.names.s2_raw, source_partition=0, source_offset=self.done,
                                  max_bytes=1000)  # fmt: skip
                assert not out.value and out.key, "the dead letter is reduced to its key and provenance"
            else:
                record.decision.decision = DECISION_KEEP
                out = encode_record(record, self.names.s2_decided)
            self.append(out.topic, out.key, out.value, out.headers)
            self.done += 1

    def publish(self, records: list[PairRecord]) -> None:
        for record in records:
            sent = encode_record(record, self.names.s2_raw)
            self.append(sent.topic, sent.key, sent.value, sent.headers)

    def tick(self, poll: int) -> None:
        """A poll: a second passes while the pipeline works."""
        self.now += 1.0
        self.work()

    def producer(self) -> RecordingProducer:
        return RecordingProducer(self)

    def consumer(self) -> TopicsConsumer:
        return TopicsConsumer(self, self.tick)


GOOD = [{"role": "assistant", "content": "good"}]
BAD = [{"role": "assistant", "content": "bad"}]


def records(n: int, tag: str, pad: int = 0) -> list[PairRecord]:
    return [
        new_record(new_pair([{"role": "user", "content": f"{tag} question {i}" + "." * pad}], GOOD, BAD, source="unit"))
        for i in range(n)
    ]


@pytest.fixture()
def topics() -> TopicSettings:
    return TopicSettings()


def executor_over(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, timeout_s: float) -> executors.KafkaExecutor:
    monkeypatch.setattr(executors, "time", pipeline)
    monkeypatch.setattr(clients, "make_producer", lambda kafka: pipeline.producer())
    monkeypatch.setattr(clients, "make_consumer", lambda kafka, group, **kw: pipeline.consumer())
    return executors.KafkaExecutor(Settings(topics=pipeline.names), timeout_s=timeout_s)


def test_a_dead_letter_left_without_its_payload_still_ends_its_record(monkeypatch, topics) -> None:
    # A record whose dead-letter copy is over the topic's limit is dead-lettered as its key and provenance only.
    # The executor decoded dead letters as records and skipped this one: its record stayed pending, the batch
    # timed out, and every retry of the step met the same dead letter: the run never got past the batch.
    batch = records(3, "dlq", pad=1000)
    pipeline = Pipeline(topics, per_poll=1, too_large=frozenset({batch[1].pair.id}))
    result = executor_over(pipeline, monkeypatch, timeout_s=10).run("stage2", batch)
    assert [r.pair.id for r, _ in result.failed] == [batch[1].pair.id]
    assert "left out" in result.failed[0][1], "the dead letter's reason is kept"
    assert sorted(r.pair.id for _, r in result.routed) == sorted(r.pair.id for r in (batch[0], batch[2]))
    assert len(pipeline.messages(topics.s2_raw)) == 3, "published once"


def test_a_batch_behind_an_earlier_attempts_copies_waits_while_they_come_back(monkeypatch, topics) -> None:
    # A retried batch completes from its first attempt's results; the retry's own copies are still queued, and the
    # next batch is published behind them. At one pair a second, 30 queued copies against a 10 s timeout: the
    # executor counted only this batch's results as progress, timed out while the pipeline worked through them,
    # and the retry queued another copy of this batch: after one timeout every batch timed out once.
    pipeline = Pipeline(topics, per_poll=1)
    pipeline.publish(records(30, "earlier"))
    batch = records(5, "next")
    result = executor_over(pipeline, monkeypatch, timeout_s=10).run("stage2", batch)
    assert sorted(r.pair.id for _, r in result.routed) == sorted(r.pair.id for r in batch)
    assert len(pipeline.messages(topics.s2_raw)) == 35, "published once"


def test_a_pipeline_that_stops_still_times_out(monkeypatch, topics) -> None:
    # The wait goes on while results come back, whosever they are, and not past `timeout_s` of silence.
    pipeline = Pipeline(topics, per_poll=1)
    pipeline.publish(records(3, "earlier"))
    executor = executor_over(pipeline, monkeypatch, timeout_s=10)
    batch = records(2, "lost")
    original = pipeline.work

    def stops_after_the_backlog() -> None:
        if pipeline.done < 3:
            original()

    pipeline.work = stops_after_the_backlog  # type: ignore[method-assign]
    with pytest.raises(TimeoutError, match="2 of 2 records not back, none for 10s"):
        executor.run("stage2", batch)
    assert pipeline.now <= 3 + 10 + 1


class Cluster:
    """The JobBackend calls ClusterJobs makes, in memory: each Job created fails the way `pod` (a V1Pod) did."""

    def __init__(self, pod: Any, condition: Any) -> None:
        from kubernetes import client

        self.jobs: dict[str, Any] = {}
        self.pod, self.condition = pod, condition
        cluster = self

        class Batch:
            def list_namespaced_job(self, namespace: str, label_selector: str, **kw: Any) -> Any:
                return client.V1JobList(items=[])

            def read_namespaced_job(self, name: str, namespace: str, **kw: Any) -> Any:
                return cluster.jobs[name]

        class Core:
            def create_namespaced_config_map(self, namespace: str, body: Any, **kw: Any) -> None: ...

            def replace_namespaced_config_map(self, name: str, namespace: str, body: Any, **kw: Any) -> None: ...

            def list_namespaced_pod(self, namespace: str, label_selector: str, **kw: Any) -> Any:
                return client.V1PodList(items=[cluster.pod])

        self.batch, self.core = Batch(), Core()

    def submit(self, spec: Any) -> Any:
        from kubernetes import client

        meta = client.V1ObjectMeta(name=spec.name, namespace=spec.namespace, uid=f"uid-{spec.name}")
        self.jobs[spec.name] = client.V1Job(metadata=meta, status=client.V1JobStatus(conditions=[self.condition]))
        return self.jobs[spec.name]

    def wait(self, namespace: str, name: str, timeout_s: float) -> str:
        return "Failed"


def failed_pod(**status: Any) -> Any:
    from kubernetes import client

    return client.V1Pod(metadata=client.V1ObjectMeta(name="rm-gold-x-a1-abcde"), status=client.V1PodStatus(**status))


def test_a_failed_training_job_says_why(tmp_path: Path) -> None:
    # A pod OOMKilled (backoffLimit 0: the Job fails with it): the step said "ended Failed", the controller
    # restarted into the same OOM twice more, and the reason was only to be had with kubectl.
    from kubernetes import client

    oom = client.V1ContainerStateTerminated(reason="OOMKilled", exit_code=137)
    container = client.V1ContainerStatus(name="train", image="synpref/train:1", image_id="", ready=False,
                                         restart_count=0, state=client.V1ContainerState(terminated=oom))  # fmt: skip
    backoff = client.V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded",
                                    message="Job has reached the specified backoff limit")  # fmt: skip
    cluster = Cluster(failed_pod(phase="Failed", container_statuses=[container]), backoff)
    job = {"image": "synpref/train:1", "namespace": "curation"}
    settings = load_settings(controller={"workdir": str(tmp_path), "training": "k8s", "k8s_job": job})
    models = K8sModels(settings.controller, tmp_path, backend=ClusterJobs(cluster))
    with pytest.raises(RuntimeError) as raised:
        models.train("gold", [], [], tmp_path / "models")
    said = str(raised.value)
    assert "ended Failed: BackoffLimitExceeded: Job has reached the specified backoff limit" in said
    assert "rm-gold-x-a1-abcde: train OOMKilled (exit code 137)" in said


def test_an_evicted_pod_and_a_job_past_its_deadline_say_so(monkeypatch) -> None:
    from kubernetes import client

    deadline = client.V1JobCondition(type="Failed", status="True", reason="DeadlineExceeded",
                                     message="Job was active longer than specified deadline")  # fmt: skip
    evicted = failed_pod(phase="Failed", reason="Evicted", message="The node was low on resource: memory.")
    cluster = Cluster(evicted, deadline)
    cluster.submit(SimpleNamespace(name="rm-final-x-a1", namespace="curation"))
    said = ClusterJobs(cluster).why_failed("curation", "rm-final-x-a1")
    assert said == (
        "DeadlineExceeded: Job was active longer than specified deadline; "
        "pod rm-gold-x-a1-abcde: Evicted: The node was low on resource: memory."
    )
    # Only a diagnosis: an API server that does not answer leaves the reason out and raises nothing.
    monkeypatch.setattr(cluster.batch, "read_namespaced_job", lambda *a, **kw: (_ for _ in ()).throw(OSError("gone")))
    monkeypatch.setattr(cluster.core, "list_namespaced_pod", lambda *a, **kw: (_ for _ in ()).throw(OSError("gone")))
    assert ClusterJobs(cluster).why_failed("curation", "rm-final-x-a1") == ""
