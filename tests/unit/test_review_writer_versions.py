"""Review: where a dataset version's writer resumes, the chart's labels for any release name, the SASL password."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka.structs import TopicPartition
from pydantic import ValidationError

from synpref.services.dataset_writer.dataset import DatasetVersion
from synpref.services.dataset_writer.main import DatasetSink, ManifestSink, make_spec, writable_only
from synpref.shared.config import KafkaSettings, ServiceSettings, Settings, WriterSettings, load_settings
from synpref.shared.kafka.clients import consumer_config, producer_config
from synpref.shared.kafka.runner import StageRunner, _Rebalance
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".cache" / "bin" / "helm"
T0, T1 = TopicPartition("t", 0), TopicPartition("t", 1)


def kept(i: int) -> PairRecord:
    record = new_record(new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                                 [{"role": "assistant", "content": "b"}], "review"))  # fmt: skip
    record.decision.decision = DECISION_KEEP
    return record


class SeekRecorder:
    def __init__(self) -> None:
        self.seeks: dict[TopicPartition, int] = {}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset


def seeks_on_assignment(root: Path, version: str, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
    """Where the writer's runner seeks `assigned` for `version`: the real sink and the runner's rebalance listener."""
    cfg = WriterSettings(root=str(root), name="d", version=version)
    dataset = DatasetVersion(root, "d", version)
    try:
        runner = StageRunner(Settings(), writable_only, service="writer", input_route="curated",
                             sink=ManifestSink(DatasetSink(dataset), cfg))  # fmt: skip
        runner.consumer = SeekRecorder()
        _Rebalance(runner).on_partitions_assigned(assigned)
        return runner.consumer.seeks
    finally:
        dataset.close()


def test_a_new_version_starts_at_the_beginning_not_at_the_previous_versions_offsets(tmp_path: Path) -> None:
    # v1 was written up to offsets 5 and 7; its group (all versions shared synpref-writer then) committed them too.
    with DatasetVersion(tmp_path, "d", "v1") as v1:
        v1.append([kept(0)], {"t:0": 5, "t:1": 7})
    # Before: v2 had nothing to seek to and resumed at the group's (v1's) offsets, so it held none of v1's pairs.
    assert seeks_on_assignment(tmp_path, "v2", {T0, T1}) == {T0: 0, T1: 0}
    assert seeks_on_assignment(tmp_path, "v1", {T0, T1}) == {T0: 5, T1: 7}, "a restarted version resumes"


def test_a_partition_the_manifest_has_no_offset_for_starts_at_the_beginning(tmp_path: Path) -> None:
    with DatasetVersion(tmp_path, "d", "v1") as v1:
        v1.append([kept(0)], {"t:0": 3})
    assert seeks_on_assignment(tmp_path, "v1", {T0, T1}) == {T0: 3, T1: 0}
    assert ManifestSink(DatasetSink(DatasetVersion(tmp_path, "d", "v3")), WriterSettings()).stored_offsets() == {}


def test_each_version_has_its_own_consumer_group_unless_one_is_set(tmp_path: Path) -> None:
    # Before: every version was in synpref-writer, so two versions running side by side split the partitions (each
    # missing the other's until one stopped) and the group's lag mixed versions.
    specs = []
    for version in ("v1", "v2"):
        spec = make_spec(Settings(writer=WriterSettings(root=str(tmp_path), name="d", version=version)), None)  # type: ignore[arg-type]
        specs.append(spec)
        spec.sink.target.dataset.close()  # type: ignore[union-attr]
    assert [s.group_id for s in specs] == ["synpref-writer-d-v1", "synpref-writer-d-v2"]


def run_writer(settings: Settings, version: str, rows: int, timeout_s: float) -> int:
    """The writer service's runner (make_spec's stage, sink and static member) for `version` until it holds `rows`
    rows or `timeout_s` passes; returns its rows."""
    settings = settings.model_copy(update={"writer": settings.writer.model_copy(update={"version": version})})
    spec = make_spec(settings, None)  # type: ignore[arg-type]
    assert spec.sink is not None
    runner = StageRunner(settings, spec.stage, service=spec.name, input_route=spec.input_route, sink=spec.sink,
                         instance_id=spec.instance_id)  # fmt: skip
    dataset = spec.sink.target.dataset  # type: ignore[attr-defined]
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while dataset.stats["rows"] < rows and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.1)
    runner.stop.set()
    thread.join(timeout=30)
    dataset.close()
    assert not thread.is_alive()
    return int(dataset.stats["rows"])


@pytest.mark.integration
def test_two_versions_written_one_after_another_each_hold_every_pair(
    kafka_settings: Any, unique_topics: Any, unique_group: Any, tmp_path: Path
) -> None:
    """The real broker: offsets below the earliest retained one reset to it, and v2 gets v1's pairs too."""
    from kafka_broker import produce

    from synpref.shared.kafka.clients import make_admin

    topics = unique_topics(partitions=2)
    kafka = kafka_settings.kafka.model_copy(update={"session_timeout_ms": 6000})
    settings = kafka_settings.model_copy(update={
        "kafka": kafka, "topics": topics, "service": ServiceSettings(group_id=unique_group()),
        "writer": WriterSettings(root=str(tmp_path), name="d", flush_interval_s=0.2),
    })  # fmt: skip
    produce(kafka, topics.curated, [kept(i) for i in range(4)])
    admin = make_admin(kafka)
    try:  # retention removed the first records of partition 0: offset 0 is out of range there
        admin.delete_records({TopicPartition(topics.curated, 0): 1})
    finally:
        admin.close()
    produce(kafka, topics.curated, [kept(i) for i in range(4, 10)])
    assert run_writer(settings, "v1", 9, 60) == 9
    # v1's static member stays in the group for session_timeout_ms; then v2 gets every partition.
    assert run_writer(settings, "v2", 9, 60) == 9


def helm_render(release: str, namespace: str) -> list[dict[str, Any]]:
    if not HELM.exists():
        pytest.skip(f"no helm at {HELM} (make helm)")
    base = ROOT / "charts" / "synpref" / "ci" / "base-values.yaml"
    proc = subprocess.run([str(HELM), "template", release, str(ROOT / "charts" / "synpref"), "--namespace", namespace,
                           "-f", str(base), "--set", "ingest.enabled=true"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def non_strings(node: Any, path: str = "") -> list[str]:
    """Paths of the labels, selectors, namespaces and command lines that YAML reads as something else than a string."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in non_strings(v, f"{path}/{k}")]
    if isinstance(node, list):
        return [p for v in node for p in non_strings(v, f"{path}[]")]
    where = ("labels", "Labels", "selector", "namespace", "command", "args")
    return [f"{path}={node!r}"] if not isinstance(node, str) and any(w in path for w in where) else []


@pytest.mark.integration
@pytest.mark.parametrize(("release", "namespace"), [("123", "456"), ("on", "2024")])
def test_a_release_or_namespace_name_yaml_reads_as_a_number_or_a_bool_renders_strings(
    release: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubernetes_validate

    from synpref.training.k8s_job import TrainingJobSpec

    docs = helm_render(release, namespace)
    bad = [f"{d['kind']}/{d['metadata']['name']}{p}" for d in docs for p in non_strings(d)]
    assert not bad, bad  # before: app.kubernetes.io/instance: 123 (or true), namespace: 456
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == f"{release}-synpref-config"]
    monkeypatch.delenv("SYNPREF_CONFIG", raising=False)
    (tmp_path / "config.yaml").write_text(cm["data"]["config.yaml"])
    # The controller's training Jobs (cluster_models.job_spec) and `synpref train submit` read these as strings.
    job = load_settings(tmp_path / "config.yaml").controller.k8s_job
    for values in (job, yaml.safe_load(cm["data"]["train-job.yaml"])):
        spec = TrainingJobSpec.model_validate({**values, "name": "x"})
        assert spec.namespace == namespace and spec.labels["app.kubernetes.io/instance"] == release


def test_the_sasl_password_is_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = KafkaSettings(sasl_mechanism="PLAIN", sasl_username="svc", sasl_password="s3cret-pw")
    assert "s3cret-pw" not in repr(kafka) and "s3cret-pw" not in str(kafka)
    assert "s3cret-pw" not in repr(Settings(kafka=kafka))
    # A YAML number or list where the password goes: the error names the field, not the value.
    for value in (12345678, ["s3cret-pw"]):
        for model, data in ((KafkaSettings, {"sasl_password": value}), (Settings, {"kafka": {"sasl_password": value}})):
            with pytest.raises(ValidationError) as info:
                model.model_validate(data)
            assert "sasl_password" in str(info.value)
            assert "12345678" not in str(info.value) and "s3cret-pw" not in str(info.value)


def test_the_kafka_clients_still_get_the_plain_sasl_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNPREF_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("SYNPREF_KAFKA__SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("SYNPREF_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("SYNPREF_KAFKA__SASL_PASSWORD", "s3cret-pw")
    monkeypatch.delenv("SYNPREF_CONFIG", raising=False)
    kafka = load_settings().kafka
    for config in (producer_config(kafka), consumer_config(kafka, "g"), kafka.client_kwargs()):
        assert config["sasl_plain_password"] == "s3cret-pw"
    empty = KafkaSettings(sasl_mechanism="PLAIN", sasl_password="").client_kwargs()
    assert empty["sasl_plain_password"] == "" and KafkaSettings(sasl_mechanism="PLAIN").client_kwargs()[
        "sasl_plain_password"] is None  # fmt: skip
