"""Issue 12, item 6: the pipeline services' gRPC endpoints accepted anyone.

An anonymous DatasetWriterService.ProcessBatch wrote an "INJECTED" row into the dataset
version the Kafka runner was writing. Now ProcessBatch is off while a service consumes
Kafka (service.grpc_process_batch turns it on), and with service.grpc_token_file every RPC
but grpc.health.v1 needs `authorization: Bearer <token>`; the health service stays open
for the kubelet's probe.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import pyarrow.parquet as pq
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kafka_broker import produce
from synpref_procs import Proc, watch_alive, write_config

from synpref.services.dataset_writer.dataset import MANIFEST
from synpref.shared.pairs import new_pair, new_record
from synpref.v1 import pipeline_pb2, pipeline_pb2_grpc
from synpref.v1.pair_pb2 import DECISION_KEEP, PairRecord

pytestmark = pytest.mark.integration
TOKEN = "s3cret-pipeline-token-0123456789"


def kept(text: str) -> PairRecord:
    record = new_record(
        new_pair(
            [{"role": "user", "content": f"question {text}"}],
            [{"role": "assistant", "content": text}],
            [{"role": "assistant", "content": f"worse {text}"}],
            source="security",
        )
    )
    record.decision.decision = DECISION_KEEP
    return record


def grpc_address(proc: Proc) -> str:
    match = re.search(r"ready: grpc=(\S+):(\d+) ", proc.text())
    assert match, proc.text()[-2000:]
    return f"127.0.0.1:{match.group(2)}"


def start_writer(tmp_path: Path, kafka: Any, topics: Any, group: str, **service: Any) -> tuple[Proc, Path]:
    config = write_config(
        tmp_path / "config.yaml", kafka.bootstrap_servers, topics,
        service={"group_id": group, **service},
        writer={"root": str(tmp_path / "datasets"), "name": "sec", "version": "v1", "flush_interval_s": 0.2},
    )  # fmt: skip
    writer = Proc("writer", ["writer"], config, tmp_path).start()
    writer.wait_ready()
    return writer, tmp_path / "datasets" / "sec" / "v1"


def rows(folder: Path) -> int:
    manifest = folder / MANIFEST
    return json.loads(manifest.read_text())["rows"] if manifest.exists() else 0


def written_texts(folder: Path) -> str:
    return " ".join(str(pq.read_table(p).to_pylist()) for p in sorted(folder.glob("part-*.parquet")))


def test_an_anonymous_process_batch_writes_nothing_into_a_kafka_writer(
    kafka_settings: Any, unique_topics: Any, unique_group: Any, tmp_path: Path
) -> None:
    kafka = kafka_settings.kafka
    topics = unique_topics()
    writer, folder = start_writer(tmp_path, kafka, topics, unique_group())
    try:
        with grpc.insecure_channel(grpc_address(writer)) as channel:
            stub = pipeline_pb2_grpc.DatasetWriterServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ProcessBatch(pipeline_pb2.ProcessBatchRequest(records=[kept("INJECTED")]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, refused.value
        # The Kafka path still writes, and nothing else got in.
        produce(kafka, topics.curated, [kept("legitimate")])
        watch_alive(writer, lambda: rows(folder) >= 1, 90, "the Kafka record to be written")
        assert rows(folder) == 1
        texts = written_texts(folder)
        assert "legitimate" in texts and "INJECTED" not in texts
    finally:
        code = writer.stop()
    assert code == 0, writer.text()[-3000:]


def test_with_a_token_file_every_rpc_but_health_needs_the_bearer_token(
    kafka_settings: Any, unique_topics: Any, unique_group: Any, tmp_path: Path
) -> None:
    token_file = tmp_path / "grpc-token"
    token_file.write_text(TOKEN + "\n")  # a trailing newline, as `kubectl create secret --from-file` keeps it
    writer, folder = start_writer(
        tmp_path, kafka_settings.kafka, unique_topics(), unique_group(),
        grpc_token_file=str(token_file), grpc_process_batch=True,
    )  # fmt: skip
    request = pipeline_pb2.ProcessBatchRequest(records=[kept("operator backfill")])
    try:
        with grpc.insecure_channel(grpc_address(writer)) as channel:
            stub = pipeline_pb2_grpc.DatasetWriterServiceStub(channel)
            for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ProcessBatch(request, metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, refused.value)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Status(pipeline_pb2.StatusRequest(), metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert rows(folder) == 0

            # The kubelet's probe carries no token.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            reply = stub.ProcessBatch(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10)
            assert reply.written == 1 and rows(folder) == 1
    finally:
        code = writer.stop()
    assert code == 0, writer.text()[-3000:]
